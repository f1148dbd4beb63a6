"""CLIB-FIQA losses and confidence (paper Eq. 1, 4-9).

All functions take probability distributions (not logits) on the last axis,
return per-sample values where the paper defines them per sample, and work
under autocast by computing in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from data_manifest.vocabulary import QUALITY_ANCHORS

BETA = 32.0  # shape parameter of the soft mapping (Eq. 1) and of the confidence sigmoid (Eq. 8)
LAMBDA_EMD = 10.0  # weight of the quality-fitting term (Eq. 7)
FOCAL_GAMMA = 2.0  # focusing parameter of the focal loss (Eq. 5)
CONFIDENCE_EPSILON = 0.5  # offset of the confidence (Eq. 8): rho in [0.5, 1]
IGNORE_INDEX = -1  # factor label meaning "no label for this sample"
_EPS = 1e-12

DISTANCES = ("abs", "squared")


def _anchors(device: torch.device, anchors: Sequence[float] | None) -> Tensor:
    return torch.tensor(QUALITY_ANCHORS if anchors is None else anchors, dtype=torch.float32, device=device)


def soft_quality_targets(
    q: Tensor,
    beta: float | Tensor = BETA,
    *,
    distance: str = "abs",
    anchors: Sequence[float] | None = None,
) -> Tensor:
    """Soft mapping of anchors q (B,) to 5 quality levels, Eq. 1: softmax_n(-beta * d(q, a_n)).

    `beta` may be a scalar or a per-sample tensor (B,) (stage 2 uses beta * rho).
    `distance="abs"` is the paper's |q - a_n|; `"squared"` is the official code's (q - a_n)^2.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    q = q.float().reshape(-1, 1)
    a = _anchors(q.device, anchors).reshape(1, -1)
    d = (q - a).abs() if distance == "abs" else (q - a).square()
    b = torch.as_tensor(beta, dtype=torch.float32, device=q.device)
    if b.ndim > 0:
        b = b.reshape(-1, 1)
    return torch.softmax(-b * d, dim=-1)


def expected_quality(p: Tensor, anchors: Sequence[float] | None = None) -> Tensor:
    """Quality score of Eq. 2: sum_n P(n) * a_n, in [min(A), max(A)]."""
    return (p.float() * _anchors(p.device, anchors)).sum(-1)


def emd_loss(pred: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Earth Mover's Distance between two distributions over ordered levels, Eq. 4: sum_z |F_z(p) - F_z(t)|."""
    if pred.shape != target.shape:
        raise ValueError(f"emd_loss: shapes differ, pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    per_sample = (pred.float().cumsum(-1) - target.float().cumsum(-1)).abs().sum(-1)
    return _reduce(per_sample, reduction)


def official_emd_loss(pred: Tensor, target: Tensor, *, r: float = 2.0) -> Tensor:
    """The official code's distance: batch mean of (mean_z |F_z(p) - F_z(t)|^r)^(1/r) (r = 2: RMS, not Eq. 4)."""
    if pred.shape != target.shape:
        raise ValueError(f"official_emd_loss: shapes differ, pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
    diff = (pred.float().cumsum(-1) - target.float().cumsum(-1)).abs()
    return (diff.pow(r).mean(-1) + _EPS).pow(1.0 / r).mean()


def focal_loss(
    marginals: Sequence[Tensor],
    labels: Tensor,
    *,
    gamma: float = FOCAL_GAMMA,
    reduction: str = "mean",
    batch_mean_ce: bool = False,
) -> Tensor:
    """Multi-factor focal loss, Eq. 5-6: per sample, mean over factors of (1 - p_v)^gamma * CE.

    Args:
        marginals: one (B, C_m) probability tensor per factor, in FACTORS order.
        labels: (B, M) class indices; IGNORE_INDEX marks a missing label, which is
            left out of that sample's mean (a sample with no label contributes 0).
        batch_mean_ce: the official code's behaviour: CE is first averaged over the
            batch, the focal weight is applied to that mean, and the factors' losses are
            summed (train.py adds loss2..loss6), not averaged.
    """
    if labels.ndim != 2 or labels.shape[1] != len(marginals):
        raise ValueError(f"focal_loss: labels must be (B, {len(marginals)}), got {tuple(labels.shape)}")
    ces, masks = [], []
    for m, p in enumerate(marginals):
        y = labels[:, m]
        valid = y != IGNORE_INDEX
        logp = torch.log(p.float().clamp_min(_EPS))
        ce = -logp.gather(-1, y.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
        ces.append(torch.where(valid, ce, torch.zeros_like(ce)))
        masks.append(valid.float())
    ce = torch.stack(ces, dim=-1)  # (B, M)
    mask = torch.stack(masks, dim=-1)
    if batch_mean_ce:
        ce_mean = (ce * mask).sum(0) / mask.sum(0).clamp_min(1.0)  # (M,)
        return ((1 - torch.exp(-ce_mean)).pow(gamma) * ce_mean).sum()
    focal = (1 - torch.exp(-ce)).pow(gamma) * ce * mask
    per_sample = focal.sum(-1) / mask.sum(-1).clamp_min(1.0)
    return _reduce(per_sample, reduction)


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) between probability rows, per sample."""
    if p.shape != q.shape:
        raise ValueError(f"js_divergence: shapes differ, {tuple(p.shape)} vs {tuple(q.shape)}")
    p, q = p.float(), q.float()
    m = 0.5 * (p + q)
    return 0.5 * (_kl(p, m) + _kl(q, m))


def official_js(p: Tensor, q: Tensor) -> Tensor:
    """The official code's `cal_distance`: softmax applied again to both inputs and KL terms reversed."""
    p, q = p.float(), q.float()
    m = 0.5 * (torch.softmax(p, -1) + torch.softmax(q, -1))
    kl_mp = F.kl_div(torch.log_softmax(p, -1), m, reduction="none").sum(-1)
    kl_mq = F.kl_div(torch.log_softmax(q, -1), m, reduction="none").sum(-1)
    return 0.5 * (kl_mp + kl_mq)


def confidence(js: Tensor, beta: float = BETA, epsilon: float = CONFIDENCE_EPSILON) -> Tensor:
    """Confidence rho of Eq. 8: 1 / (1 + exp(beta * JS)) + epsilon; 1.0 at JS = 0, towards 0.5 as JS grows."""
    return torch.sigmoid(-beta * js.float()) + epsilon


def clib_loss(
    quality: Tensor,
    factor_marginals: Sequence[Tensor],
    quality_target: Tensor,
    factor_labels: Tensor,
    *,
    lambda_emd: float = LAMBDA_EMD,
    gamma: float = FOCAL_GAMMA,
    official: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss of Eq. 7, L_MFL + lambda * L_EMD, with its parts for logging.

    `official=True` uses the official code's batch-mean focal loss summed over the factors and its RMS CDF distance.
    """
    if official:
        emd = official_emd_loss(quality, quality_target)
        mfl = focal_loss(factor_marginals, factor_labels, gamma=gamma, batch_mean_ce=True)
    else:
        emd = emd_loss(quality, quality_target)
        mfl = focal_loss(factor_marginals, factor_labels, gamma=gamma)
    total = mfl + lambda_emd * emd
    return total, {"loss": total.detach(), "mfl": mfl.detach(), "emd": emd.detach()}


def _kl(p: Tensor, q: Tensor) -> Tensor:
    return torch.where(p > 0, p * (torch.log(p.clamp_min(_EPS)) - torch.log(q.clamp_min(_EPS))), 0.0).sum(-1)


def _reduce(x: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")

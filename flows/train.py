"""`fiqa train`: train CLIB-FIQA on the catalog (stage 1, confidence calibration, stage 2).

The training set is a SQL query over the catalog (pipeline.training.training_set); each sample's confidence
rho goes to `scores` (method "clib-fiqa-confidence"), checkpoints to <workspace>/checkpoints/<run_id>/.
`torchrun` gives DDP. See docs/model.md.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger

from data_manifest import Workspace
from flows import command, runtime
from flows.arguments import add_sql_limits
from models.clib_overrides import check_weights, model_config_with
from pipeline.training.confidence_scores import confidence_writer
from pipeline.training.training_set import REQUIRED_COLUMNS, load_training_set, training_set_sql

DEFAULT_MODEL_CONFIG = "clib-rn50"
TRAIN_OPTIONS: tuple[tuple[str, type], ...] = (
    ("stage1-epochs", int), ("stage2-epochs", int), ("batch-size", int), ("lr", float), ("num-workers", int),
    ("seed", int), ("device", str), ("keep-epochs", int),
)


@dataclass(frozen=True)
class TrainOptions:
    """Everything one `train` run needs, validated once here."""

    workspace: str | None = None
    run_id: str | None = None  # re-running a run id continues it from its last checkpoint
    model_config: str = DEFAULT_MODEL_CONFIG  # bundled config name or a JSON file
    pretrained: str | None = None  # CLIP weights overriding the config's ("none": random init)
    trust_torchscript: bool = False  # allow a TorchScript archive as pretrained weights
    where: str | None = None  # SQL filter over the training-set columns
    query: str | None = None  # or a full training-set query
    resume: str | None = None  # continue from this checkpoint
    train_config: dict[str, Any] = field(default_factory=dict)  # models.train.TrainConfig overrides

    def __post_init__(self) -> None:
        from models.train import TrainConfig

        object.__setattr__(self, "train_config", dict(self.train_config or {}))
        TrainConfig.from_dict(self.train_config)  # unknown keys and bad values fail here
        self.model()  # an unknown config name or a bad JSON file fails here
        training_set_sql(self.where, self.query)  # --where with --query fails here
        if self.resume and not Path(self.resume).is_file():
            raise FileNotFoundError(f"--resume checkpoint {self.resume} does not exist")

    def model(self) -> Any:
        """The model config with the --pretrained / --trust-torchscript overrides."""
        return model_config_with(self.model_config, self.pretrained, self.trust_torchscript)

    def resume_from(self, ws: Workspace) -> Path | None:
        """The checkpoint to continue from: --resume, else the run id's last checkpoint when it exists."""
        if self.resume:
            return Path(self.resume)
        last = ws.checkpoints / self.run_id / "last.pt" if self.run_id else None
        return last if last is not None and last.exists() else None


@flow(name="train", log_prints=True)
def train_run(opts: TrainOptions) -> dict[str, Any]:
    """Select the training set (SQL), train, write the confidences and the checkpoints."""
    from models.train import TrainConfig, train

    mcfg, tcfg = opts.model(), TrainConfig.from_dict(opts.train_config)
    ws = Workspace(opts.workspace)
    params = {"model_config": mcfg.to_dict(), "train_config": asdict(tcfg), "where": opts.where,
              "query": opts.query, "resume": opts.resume}
    with runtime.tracked_run(ws, "train", params, opts.run_id) as state:
        rid = state["run_id"]
        ckpt_dir = ws.checkpoints / rid
        data = load_training_set(ws, opts.where, opts.query)
        resume_from = opts.resume_from(ws) or (ckpt_dir / "last.pt" if (ckpt_dir / "last.pt").exists() else None)
        result = train(mcfg, data, tcfg, ckpt_dir, resume=resume_from, log=get_run_logger().info,
                       on_confidence=confidence_writer(ws, rid, data.sample_ids, f"{rid}/last.pt"))
        final = result.history[-1] if result.history else {}
        rho = result.rho[np.isfinite(result.rho)]
        state["counts"] = {"samples": len(data.sample_ids)}
        state["metrics"] = {"checkpoint": str(result.checkpoint), "final": final,
                            "rho_mean": float(rho.mean()) if rho.size else None,
                            "rho_min": float(rho.min()) if rho.size else None}
        return {"run_id": rid, **state["metrics"], "samples": len(data.sample_ids)}


def train_worker_rank(opts: TrainOptions) -> dict[str, Any]:
    """A non-zero DDP rank: the same training set and loop, without run records or manifest writes."""
    import tempfile

    from models.train import TrainConfig, train

    ws = Workspace(opts.workspace)
    data = load_training_set(ws, opts.where, opts.query)
    with tempfile.TemporaryDirectory() as tmp:  # only rank 0 writes checkpoints
        train(opts.model(), data, TrainConfig.from_dict(opts.train_config), tmp, resume=opts.resume_from(ws),
              log=None)
    return {"rank": int(os.environ.get("RANK", "0"))}


def run(opts: TrainOptions) -> dict[str, Any]:
    """Check the weights (before Prefect starts; a resume needs none), then train: rank 0 in the flow."""
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: only rank 0 runs the flow and writes
        return train_worker_rank(opts)
    if opts.resume_from(Workspace(opts.workspace, create=False)) is None:
        check_weights(opts.model())
    return train_run(opts)


def train_flow(**kwargs: Any) -> dict[str, Any]:
    """Run the `train` flow from keyword options (the fields of TrainOptions)."""
    return run(TrainOptions(**kwargs))


def configure_parser(p: argparse.ArgumentParser) -> None:
    command.add_common_args(p, runner=False)
    p.add_argument("--model-config", default=DEFAULT_MODEL_CONFIG,
                   help="bundled config name (clib-rn50, clib-tiny) or a JSON file (see models/configs)")
    p.add_argument("--pretrained", default=None, metavar="TAG|PATH|none",
                   help="CLIP weights overriding the config's: an open_clip tag (needs the hub), a local state dict, "
                        ".safetensors or hub-snapshot directory, OpenAI's TorchScript .pt (with --trust-torchscript), "
                        "or none (random init)")
    p.add_argument("--trust-torchscript", action="store_true",
                   help="allow loading a TorchScript archive (e.g. OpenAI's RN50.pt) with torch.jit.load; "
                        "only for a file you trust, since loading it can run code stored in it")
    p.add_argument("--where", default=None, help="SQL filter on the training set, e.g. \"pose_index = 2\"")
    add_sql_limits(p)
    p.add_argument("--query", default=None, help="a full SQL query returning " + ", ".join(REQUIRED_COLUMNS))
    p.add_argument("--resume", default=None, help="continue from this checkpoint (same data and config)")
    p.add_argument("--config-json", default=None, help="JSON object of TrainConfig overrides")
    command.add_config_options(p, TRAIN_OPTIONS)
    p.add_argument("--official", action="store_true",
                   help="the official code's loss/confidence/schedule quirks (see docs/DIFFERENCES.md)")


def train_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig overrides from --config-json, the training options and --official."""
    cfg = command.config_overrides(args, TRAIN_OPTIONS)
    if args.official:
        cfg.update(official_losses=True, official_js=True, schedule="official", distance="squared",
                   logit_scale_max=None, freeze_visual_positional_embedding=True)
    return cfg


def run_cli(args: argparse.Namespace) -> int:
    out = run(command.options_from_args(TrainOptions, args, train_config=train_config_from_args(args)))
    print(json.dumps(out, indent=2, default=str))
    return 0


main = command.main_for(__name__)

if __name__ == "__main__":
    raise SystemExit(main())

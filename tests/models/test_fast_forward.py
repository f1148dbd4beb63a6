"""The fast CPU engines (onnxruntime, frozen TorchScript): same outputs as eager torch, or a clear refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.fast_forward import (
    EngineMismatchError,
    FastForward,
    batched,
    resolve_backend,
)


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.PReLU(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(self.act(self.bn(self.conv(x))).mean(dim=(2, 3))), dim=1)


class _Stateful(nn.Module):
    """Its output changes from call to call: a traced copy cannot follow, so the engines must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.flatten(1) * float(self.calls)


def _small() -> _Small:
    torch.manual_seed(0)
    net = _Small().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.3, 0.3)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.act.weight.uniform_(0.05, 0.4)
    return net


@pytest.mark.parametrize("engine", ["onnx", "torchscript"])
def test_engine_equals_eager_torch(engine):
    net = _small()
    fast = FastForward(net, (2, 9, 9), engine, threads=1)
    assert fast.engine == engine and fast.threads == 1 and fast.max_probe_diff <= 1e-5
    x = np.random.default_rng(1).normal(size=(7, 2, 9, 9)).astype(np.float32)
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(fast(x), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(batched(fast, x, 3), want, rtol=0, atol=1e-6)  # chunks of 3, 3 and 1
    assert not np.allclose(want[0], want[1], atol=1e-3)
    with pytest.raises(ValueError, match=r"expected input \(N, 2, 9, 9\)"):
        fast(x[:, :1])


@pytest.mark.parametrize("engine", ["onnx", "torchscript"])
def test_engine_that_differs_from_torch_is_refused(engine):
    with pytest.raises(EngineMismatchError, match=f"{engine} differs from eager torch"):
        FastForward(_Stateful(), (1, 4, 4), engine)


def test_backend_choice_and_errors():
    assert resolve_backend("auto", "cpu", "onnx") == "onnx"
    assert resolve_backend("auto", "cpu", "torchscript") == "torchscript"
    assert resolve_backend("auto", "cuda:0", "onnx") == "torch"
    assert resolve_backend("torch", "cpu", "onnx") == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("onnx", "cuda", "onnx")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("tvm", "cpu", "onnx")
    with pytest.raises(ValueError, match="engine must be"):
        FastForward(_small(), (2, 9, 9), "torch")
    with pytest.raises(ValueError, match="at least one"):
        batched(lambda a: a, np.empty((0, 2)), 4)

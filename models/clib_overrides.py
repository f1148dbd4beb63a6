"""A CLIB-FIQA model config with the command line's weight overrides, and the check that its weights can be had."""

from __future__ import annotations

from typing import Any


def model_config_with(model_config: str, pretrained: str | None = None, trust_torchscript: bool = False) -> Any:
    """The model config (bundled name or JSON file); `pretrained` ("none": random init) overrides its weights."""
    from dataclasses import replace

    from models.clib import ClibConfig

    mcfg = ClibConfig.from_json(model_config)
    if pretrained is not None:
        mcfg = replace(mcfg, pretrained=None if pretrained.lower() == "none" else pretrained)
    if trust_torchscript:
        mcfg = replace(mcfg, trust_torchscript=True)
    return mcfg


def check_weights(mcfg: Any) -> None:
    """Fail before any work when the pretrained weights cannot be had (offline tag, missing file, mismatch)."""
    from models.clib import resolve_pretrained

    resolve_pretrained(mcfg.model_name, mcfg.pretrained, trust_torchscript=mcfg.trust_torchscript)

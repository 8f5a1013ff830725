"""Rotary position embedding frequencies for the Llama family, as transformers computes them."""

from __future__ import annotations

import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from runtime.errors import UnsupportedArchitectureError
from runtime.model.arch import ArchConfig

_DYNAMIC = ("dynamic", "longrope")


def rope_parameters(arch: ArchConfig) -> dict[str, object]:
    """The config's rope settings (``rope_parameters`` in transformers 5, else the older
    ``rope_theta`` / ``rope_scaling`` keys)."""
    raw = arch.raw
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params.setdefault("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    return params


def rotary_parameters(arch: ArchConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the attention scaling of the model's rope."""
    params = rope_parameters(arch)
    rope_type = str(params["rope_type"])
    if rope_type == "default":
        theta = float(params["rope_theta"])  # type: ignore[arg-type]
        exponents = torch.arange(0, arch.head_dim, 2, dtype=torch.float) / arch.head_dim
        return 1.0 / (theta**exponents), 1.0
    if rope_type in _DYNAMIC or rope_type not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedArchitectureError(
            f'rope type "{rope_type}" is not supported; supported: default, '
            + ", ".join(sorted(k for k in ROPE_INIT_FUNCTIONS if k not in _DYNAMIC))
        )
    config = AutoConfig.for_model(**arch.raw)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv_freq.float(), float(scaling)

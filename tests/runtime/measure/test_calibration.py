"""Calibration statistics against transformers' own model, and a range at a time vs whole."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from planner.model_spec import load_model_spec
from planner.quality_target import load_calibration
from runtime.measure.calibration import OP_NAMES, CalibrationResult, collect_statistics
from runtime.measure.passes import TokenWindows, token_windows
from runtime.model.arch import LINEAR_NAMES, arch_from_config, layer_prefix, read_config
from runtime.quant.kernels import choose_kernel_path, scale_dtype_for
from runtime.quant.packing import dequantize, quantize_rtn
from tests.runtime.model.checkpoints import save_checkpoint, tiny_configs

pytestmark = pytest.mark.usefixtures("one_thread")

GROUP = 32


def stream(vocab: int, n: int = 150) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(5))


@cache
def checkpoint(family: str, root: str) -> Path:
    return save_checkpoint(tiny_configs()[family], Path(root) / family)


@pytest.fixture(params=["llama", "opt"])
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.getbasetemp() / "calibration"
    return checkpoint(str(request.param), str(root))


def windows() -> TokenWindows:
    return token_windows(stream(128), seq_len=32, micro_batch=2)  # 4 full windows + 1 of 21


def calibrate(directory: Path, per_pass: int) -> CalibrationResult:
    return collect_statistics(directory, windows(), group_size=GROUP, layers_per_pass=per_pass)


def hf_inputs(directory: Path) -> dict[tuple[int, str], torch.Tensor]:
    """Every linear operator's inputs [tokens, in] in transformers' model over the windows."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    arch = arch_from_config(read_config(directory), str(directory))
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for layer in range(arch.num_layers):
        for short, path in LINEAR_NAMES[arch.family].items():
            module = model.get_submodule(layer_prefix(arch, layer) + path)
            key = (layer, OP_NAMES[short])
            seen[key] = []
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, key=key: seen[key].append(
                        args[0].reshape(-1, args[0].shape[-1])
                    )
                )
            )
    with torch.no_grad():
        for batch in windows().batches:
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def close(a: float, b: float, rel: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def test_statistics_match_transformers_and_the_weights(family_dir: Path) -> None:
    result = calibrate(family_dir, per_pass=4)
    inputs = hf_inputs(family_dir)
    arch = arch_from_config(read_config(family_dir), str(family_dir))
    tensors = load_file(str(family_dir / "model.safetensors"))
    assert result.stats["tokens"] == 149
    for layer, entry in enumerate(result.stats["layers"]):
        for short, path in LINEAR_NAMES[arch.family].items():
            op = entry[OP_NAMES[short]]
            x = inputs[(layer, OP_NAMES[short])].double()
            assert x.shape[0] == 149
            assert close(op["input_sq_mean"], float(x.square().mean()))
            w = tensors[layer_prefix(arch, layer) + path + ".weight"].double()
            groups = w.view(w.shape[0], -1, GROUP)
            ranges = (groups.amax(-1) - groups.amin(-1)).square().mean()
            assert close(op["group_range_sq_mean"], float(ranges), 1e-9)
            assert close(op["row_absmax_sq_mean"], float(w.abs().amax(1).square().mean()), 1e-9)
            for bits in (8, 4, 3, 2):
                path = choose_kernel_path(bits, w.shape[1], w.shape[0], GROUP, torch.device("cpu"))
                q = quantize_rtn(w.float(), bits, GROUP, scale_dtype_for(path))  # as served
                delta = w - dequantize(q).double()
                direct = float((x @ delta.t()).square().mean())
                assert close(op["output_error_sq"][str(bits)], direct, 1e-3)


def test_the_planner_loads_what_calibration_writes(tmp_path: Path) -> None:
    directory = checkpoint("llama", str(tmp_path))
    result = calibrate(directory, per_pass=4)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(result.stats), encoding="utf-8")
    loaded = load_calibration(path, load_model_spec(directory), GROUP)
    assert loaded.indicator.name == "measured" and loaded.mapping is None
    omega = loaded.indicator.omega  # [layers, (16, 8, 4, 3, 2)]
    assert omega.shape == (4, 5)
    assert (omega[:, 0] == 0).all() and math.isclose(omega[:, 4].sum(), 1.0)
    assert (omega[:, 1] < omega[:, 2]).all() and (omega[:, 2] < omega[:, 3]).all()
    assert (omega[:, 3] < omega[:, 4]).all()


def _numbers(value: Any, path: str = "") -> dict[str, float]:
    if isinstance(value, dict):
        return {k2: v2 for k, v in value.items() for k2, v2 in _numbers(v, f"{path}.{k}").items()}
    if isinstance(value, list):
        return {
            k2: v2 for i, v in enumerate(value) for k2, v2 in _numbers(v, f"{path}[{i}]").items()
        }
    return {path: value} if isinstance(value, int | float) else {}


def test_a_layer_range_at_a_time_equals_the_whole_model(family_dir: Path) -> None:
    whole, by_one = calibrate(family_dir, per_pass=4), calibrate(family_dir, per_pass=1)
    by_two = calibrate(family_dir, per_pass=3)  # ranges of 3 and 1 layers
    a = _numbers(whole.stats)
    for other in (by_one, by_two):
        b = _numbers(other.stats)
        assert a.keys() == b.keys()
        assert all(close(a[k], b[k], 1e-6) for k in a), [k for k in a if not close(a[k], b[k])]
        assert close(whole.baseline.nll_sum, other.baseline.nll_sum, 1e-6)

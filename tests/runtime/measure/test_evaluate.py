"""Perplexity through the runtime's quantized layers: against transformers at 16 bits, and
ordered by precision on the built-in model."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from runtime.measure.evaluate import CALIBRATION_TOKENS, evaluate_perplexity, held_out_ids
from runtime.measure.passes import token_windows
from runtime.model.assets import builtin_model_dir
from runtime.quant.kernels import dense_weight_dtype
from tests.runtime.model.checkpoints import save_checkpoint, tiny_configs

pytestmark = pytest.mark.usefixtures("one_thread")

BUILTIN = builtin_model_dir()


def test_windows_predict_every_token_but_the_first_once() -> None:
    ids = torch.arange(1, 76)
    windows = token_windows(ids, seq_len=16, micro_batch=2)
    assert [tuple(b.shape) for b in windows.batches] == [(2, 16), (2, 16), (1, 10)]
    targets = torch.cat([t.reshape(-1) for t in windows.targets])
    assert targets.tolist() == list(range(2, 76))
    inputs = torch.cat([b.reshape(-1) for b in windows.batches])
    assert inputs.tolist() == list(range(1, 75))
    assert token_windows(ids, 16, 2, max_tokens=20).predicted_tokens == 20


def transformers_perplexity(directory: Path, ids: torch.Tensor, seq_len: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    total, count = 0.0, 0
    windows = token_windows(ids, seq_len, 3)
    with torch.no_grad():
        for batch, target in zip(windows.batches, windows.targets, strict=True):
            logits = model(input_ids=batch).logits
            total += F.cross_entropy(
                logits.flatten(0, 1), target.reshape(-1), reduction="sum"
            ).item()
            count += target.numel()
    return math.exp(total / count)


@pytest.mark.parametrize("family", ["llama-tied", "opt", "qwen2"])
def test_16_bit_perplexity_equals_transformers(family: str, tmp_path: Path) -> None:
    directory = save_checkpoint(tiny_configs()[family], tmp_path / family)
    ids = torch.randint(3, 128, (140,), generator=torch.Generator().manual_seed(2))
    expected = transformers_perplexity(directory, ids, seq_len=24)
    for impl, per_pass in (("reference", 4), ("reference", 1), ("auto", 3)):
        got = evaluate_perplexity(
            directory, ids, [16] * 4, seq_len=24, micro_batch=3, layers_per_pass=per_pass, impl=impl
        )
        assert got.tokens == 139
        exact = impl == "reference" or dense_weight_dtype(torch.float32, torch.device("cpu")) == (
            torch.float32
        )
        assert math.isclose(got.perplexity, expected, rel_tol=1e-5 if exact else 5e-3), impl


def test_builtin_perplexity_does_not_fall_as_precision_drops() -> None:
    """2 ≥ 3 ≥ 4 ≥ 8 ≥ 16 bits within noise, on 1024 tokens the calibration never reads."""
    ids = held_out_ids(BUILTIN, "evaluation")
    ppl = {
        bits: evaluate_perplexity(BUILTIN, ids, [bits] * 8, max_tokens=1024).perplexity
        for bits in (16, 8, 4, 3, 2)
    }
    order = (2, 3, 4, 8, 16)
    for low, high in itertools.pairwise(order):
        assert ppl[low] >= ppl[high] * (1 - 0.003), ppl
    assert ppl[2] > ppl[16] * 1.02, ppl  # 2 bits hurts clearly
    assert ppl[8] < ppl[16] * 1.005, ppl  # 8 bits barely


def test_held_out_parts_do_not_overlap() -> None:
    whole = held_out_ids(BUILTIN, "all")
    calibration, evaluation = (held_out_ids(BUILTIN, p) for p in ("calibration", "evaluation"))
    assert whole[0] == 0  # the end-of-text token opens the play, as in training
    assert calibration.numel() == CALIBRATION_TOKENS + 1
    # Calibration predicts tokens 1..C; evaluation reads token C and predicts C+1.. to the end.
    assert torch.equal(evaluation, whole[CALIBRATION_TOKENS:])
    assert calibration.numel() - 1 + evaluation.numel() - 1 == whole.numel() - 1


@pytest.mark.slow
def test_builtin_16_bit_held_out_perplexity_is_the_recorded_one() -> None:
    recorded = json.loads((BUILTIN / "training.json").read_text())["held_out_perplexity"]
    got = evaluate_perplexity(BUILTIN, held_out_ids(BUILTIN, "all"), [16] * 8)
    assert abs(got.perplexity - recorded) < 0.01

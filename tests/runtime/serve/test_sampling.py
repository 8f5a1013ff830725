"""Tests of runtime/serve/sampling.py: greedy rows, filters against transformers' warpers,
replayable randomness and the sampled distribution."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from runtime.serve.sampling import SamplingParams, candidate_tokens, sample

VOCAB = 97
GREEDY = SamplingParams()


def _logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale


def _draws(logits_row: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """n tokens of one request at steps 0..n-1 (one row per step, in one batch)."""
    rows = logits_row.expand(n, -1)
    return sample(rows, [params] * n, range(n))


# --------------------------------------------------------------------------- greedy


def test_greedy_rows_equal_argmax() -> None:
    logits = _logits(16)
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1.0  # a tie: argmax picks the first
    tokens = sample(logits, [GREEDY] * 16, [0] * 16)
    assert tokens.dtype == torch.int64 and tokens.device.type == "cpu"
    assert torch.equal(tokens, logits.argmax(-1))
    assert int(tokens[3]) == 10


def test_greedy_rows_mixed_with_sampled_rows_still_equal_argmax() -> None:
    logits = _logits(8)
    params = [GREEDY if r % 2 else SamplingParams(temperature=1.0, seed=r) for r in range(8)]
    tokens = sample(logits, params, [5] * 8)
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))


@pytest.mark.parametrize("temperature", [0.05, 1.0, 7.0])
def test_top_k_one_is_greedy_at_any_temperature(temperature: float) -> None:
    logits = _logits(32, seed=1)
    params = [SamplingParams(temperature=temperature, top_k=1, seed=s) for s in range(32)]
    assert torch.equal(sample(logits, params, range(32)), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_tiny_top_p_is_greedy(temperature: float) -> None:
    logits = _logits(32, seed=2)
    params = [SamplingParams(temperature=temperature, top_p=1e-6, seed=s) for s in range(32)]
    assert torch.equal(sample(logits, params, range(32)), logits.argmax(-1))


# --------------------------------------------------------------------------- replay


def test_same_seed_and_step_give_the_same_token_across_calls() -> None:
    logits = _logits(1, seed=3, scale=0.5)  # flat: many tokens are likely
    params = SamplingParams(temperature=1.0, seed=12345)
    first = [int(sample(logits, [params], [step])[0]) for step in range(50)]
    again = [int(sample(logits, [params], [step])[0]) for step in range(50)]
    assert first == again
    assert len(set(first)) > 10  # the step changes the draw


def test_a_row_samples_the_same_whatever_shares_its_batch() -> None:
    logits = _logits(12, seed=4, scale=0.5)
    params = [
        SamplingParams(temperature=0.3 + 0.2 * r, top_k=r % 4 * 20, top_p=1.0 - 0.05 * r, seed=r)
        for r in range(12)
    ]
    steps = [7 * r + 1 for r in range(12)]
    alone = [int(sample(logits[r : r + 1], [params[r]], [steps[r]])[0]) for r in range(12)]
    order = list(range(12))
    random.Random(0).shuffle(order)
    shuffled = sample(logits[order], [params[r] for r in order], [steps[r] for r in order])
    assert [int(t) for t in shuffled] == [alone[r] for r in order]
    padded = torch.cat([_logits(5, seed=9), logits])
    others = [SamplingParams(temperature=1.0, seed=99)] * 5
    together = sample(padded, others + params, [0] * 5 + steps)
    assert [int(t) for t in together[5:]] == alone


def test_different_seeds_give_different_samples() -> None:
    row = torch.zeros(VOCAB)  # uniform
    draws = {
        seed: _draws(row, SamplingParams(temperature=1.0, seed=seed), 200).tolist()
        for seed in (0, 1, 2, 2**63 - 1)
    }
    sequences = [tuple(d) for d in draws.values()]
    assert len(set(sequences)) == len(sequences)
    for a in range(len(sequences)):
        for b in range(a + 1, len(sequences)):
            agree = sum(x == y for x, y in zip(sequences[a], sequences[b], strict=True))
            assert agree < 20  # about 200 / 97 expected by chance


# --------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_frequencies_match_the_tempered_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.5, -0.3, 2.0])
    n = 20_000
    draws = _draws(logits, SamplingParams(temperature=temperature, seed=2024), n)
    counts = torch.bincount(draws, minlength=4).double()
    expected = torch.softmax(logits.double() / temperature, 0)
    for token in range(4):
        p = float(expected[token])
        standard_error = math.sqrt(p * (1 - p) / n)
        assert abs(float(counts[token]) / n - p) < 4 * standard_error, (token, counts, expected)


def test_top_k_two_only_draws_the_two_best() -> None:
    logits = _logits(1, seed=5, scale=0.3)[0]
    best_two = set(torch.topk(logits, 2).indices.tolist())
    draws = _draws(logits, SamplingParams(temperature=5.0, top_k=2, seed=8), 2000)
    assert set(draws.tolist()) == best_two


def test_top_p_draws_only_from_the_nucleus_in_proportion() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 20_000
    draws = _draws(logits, SamplingParams(temperature=1.0, top_p=0.75, seed=77), n)
    counts = torch.bincount(draws, minlength=4).double()
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 >= 0.75: the rest is cut
    p = 0.5 / 0.8
    assert abs(float(counts[0]) / n - p) < 4 * math.sqrt(p * (1 - p) / n)


# --------------------------------------------------------------------------- filters vs HF


def _hf_kept(row: torch.Tensor, params: SamplingParams) -> set[int]:
    scores = TemperatureLogitsWarper(params.temperature)(None, row[None].clone())
    if params.top_k > 0:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return set(torch.isfinite(scores[0]).nonzero().squeeze(1).tolist())


FILTERS = [
    (1.0, 0, 0.9),
    (0.7, 0, 0.5),
    (1.3, 0, 0.99),
    (0.8, 40, 1.0),
    (1.0, 40, 0.8),
    (2.0, 5, 0.3),
    (0.5, 1000, 0.95),  # top_k above the vocabulary
    (1.0, 0, 0.0),
]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), FILTERS)
@pytest.mark.parametrize("vocab", [97, 5000])
def test_kept_tokens_match_transformers_warpers(
    temperature: float, top_k: int, top_p: float, vocab: int
) -> None:
    logits = _logits(20, vocab=vocab, seed=vocab + top_k, scale=2.0)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    for row in logits:
        kept = candidate_tokens(row, params)
        assert len(set(kept.tolist())) == kept.numel()
        assert set(kept.tolist()) == _hf_kept(row, params)


@pytest.mark.parametrize(("peak", "high", "low"), [(300, 12.0, 6.0), (1500, 9.0, 6.0)])
def test_peaked_nucleus_found_without_a_full_sort_matches_transformers(
    peak: int, high: float, low: float
) -> None:
    """A peaked distribution over a large vocabulary: the nucleus lies in a partial top-k
    (of 256 tokens for the sharper peak, of 2048 for the wider one at top_p >= 0.9)."""
    logits = _logits(10, vocab=50_000, seed=6, scale=1.0)
    logits[:, :peak] += torch.linspace(high, low, peak)
    for top_p in (0.5, 0.9, 0.97):
        params = SamplingParams(temperature=1.0, top_p=top_p)
        for row in logits:
            kept = candidate_tokens(row, params)
            assert set(kept.tolist()) == _hf_kept(row, params)
            assert torch.all(row[kept][:-1] >= row[kept][1:])  # highest first


def test_samples_lie_in_the_kept_set() -> None:
    logits = _logits(1, vocab=500, seed=7, scale=1.5)[0]
    params = SamplingParams(temperature=1.2, top_k=50, top_p=0.7, seed=31)
    kept = set(candidate_tokens(logits, params).tolist())
    draws = set(_draws(logits, params, 3000).tolist())
    assert draws <= kept
    assert len(draws) > len(kept) // 2


# --------------------------------------------------------------------------- errors, devices


def test_mismatched_lengths_raise() -> None:
    logits = _logits(3)
    with pytest.raises(ValueError, match="params"):
        sample(logits, [GREEDY] * 2, [0] * 3)
    with pytest.raises(ValueError, match="steps"):
        sample(logits, [GREEDY] * 3, [0] * 4)
    with pytest.raises(ValueError, match="rows, vocab"):
        sample(logits[0], [GREEDY], [0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_logits_sample_like_cpu_logits() -> None:
    logits = _logits(16, vocab=5000, seed=8, scale=1.0)
    params = [
        GREEDY if r % 3 == 0 else SamplingParams(temperature=0.9, top_k=r * 10, top_p=0.9, seed=r)
        for r in range(16)
    ]
    on_gpu = sample(logits.cuda(), params, range(16))
    assert on_gpu.device.type == "cpu"
    assert torch.equal(on_gpu, sample(logits, params, range(16)))
    assert torch.equal(on_gpu[::3], logits.cuda().argmax(-1).cpu()[::3])

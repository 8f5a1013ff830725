"""Next-token choice at the last pipeline stage: greedy, or seeded sampling, per row.

Each row of a micro-batch carries its own `SamplingParams`. A sampled row is filtered the way
Hugging Face's warpers chain (temperature, then top-k, then top-p, at least one token kept) and
then draws one token by inverse CDF from a single uniform number. That number is a pure function
of ``(seed, step)`` (splitmix64, no torch RNG state), so a request replays the same tokens whatever
rows share its micro-batch, in whatever order, and whichever process or torch build samples it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_MASK_64 = (1 << 64) - 1
_FIRST_NUCLEUS_GUESS = 256
"""Tokens first examined for a top-p row without top-k; grows eightfold while too few."""
_NUCLEUS_MARGIN = 1e-4
"""Probability mass a partial top-k must exceed top_p by to be sure it holds the nucleus."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request picks its next token. Ranges are validated by the protocol layer."""

    temperature: float = 0.0
    """Divides the logits before filtering; 0 means greedy (argmax) and ignores the rest."""
    top_k: int = 0
    """Keep the k highest logits (and any tied with the k-th); 0 = off."""
    top_p: float = 1.0
    """Nucleus: keep the fewest most likely tokens whose probabilities sum to >= top_p; 1 = off."""
    seed: int = 0
    """0..2**63-1; with the request's step it fixes the random draw."""


def sample(logits: Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> Tensor:
    """Choose the next token of every row.

    Args:
        logits: [rows, vocab] scores of the next token, fp32, on any device.
        params: one `SamplingParams` per row.
        steps: per row, how many tokens that request has generated already.

    Returns:
        [rows] int64 token ids on the CPU. Greedy rows equal ``logits.argmax(-1)`` exactly.

    Raises:
        ValueError: logits are not 2-D, or params/steps do not have one entry per row.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    rows = logits.shape[0]
    if len(params) != rows or len(steps) != rows:
        raise ValueError(
            f"{rows} rows of logits need as many params and steps, "
            f"got {len(params)} params and {len(steps)} steps"
        )
    greedy = [row for row, p in enumerate(params) if p.temperature == 0.0]
    if len(greedy) == rows:
        return logits.argmax(-1).to("cpu", torch.int64)
    tokens = torch.empty(rows, dtype=torch.int64)
    if greedy:
        index = torch.tensor(greedy, device=logits.device)
        tokens[greedy] = logits.index_select(0, index).argmax(-1).to("cpu", torch.int64)
    sampled = [row for row, p in enumerate(params) if p.temperature != 0.0]
    index = torch.tensor(sampled, device=logits.device)
    sampled_logits = logits.index_select(0, index).to("cpu", torch.float32)  # [len(sampled), vocab]
    for scores, row in zip(sampled_logits, sampled, strict=True):
        tokens[row] = _sample_row(scores, params[row], steps[row])
    return tokens


def candidate_tokens(scores: Tensor, params: SamplingParams) -> Tensor:
    """The tokens a sampled row may draw: top-k, then top-p, of ``scores / temperature``.

    Keeps the same set as transformers' TemperatureLogitsWarper, TopKLogitsWarper and
    TopPLogitsWarper applied in that order (min_tokens_to_keep=1).

    Args:
        scores: [vocab] fp32 logits of one row, on the CPU.
        params: the row's parameters; temperature must be > 0.

    Returns:
        [kept] int64 token ids in an order fixed by the scores alone: highest logit first (ties
        by id) when a filter is on, every id in id order when none is.
    """
    scaled = scores / params.temperature
    vocab = scaled.numel()
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k).values[-1]
        ids = _by_score(scaled, torch.nonzero(scaled >= kth).squeeze(1))  # ties with kth stay
        if params.top_p >= 1.0:
            return ids
        probs = torch.softmax(scaled[ids], 0)  # renormalised over the top k, as HF does
        return ids[: _nucleus_size(probs, 0.0, params.top_p)]
    if params.top_p >= 1.0:
        return torch.arange(vocab)
    all_probs = torch.softmax(scaled, 0)
    ids = _most_likely(scaled, all_probs, params.top_p)
    probs = all_probs[ids]
    outside_mass = max(0.0, float(all_probs.sum()) - float(probs.sum()))
    return ids[: _nucleus_size(probs, outside_mass, params.top_p)]


def _most_likely(scaled: Tensor, probs: Tensor, top_p: float) -> Tensor:
    """A prefix of the ids by descending score holding the whole nucleus; avoids a full sort.

    Grows a top-k until its mass clears ``top_p`` by a margin, so every token outside it is
    dropped by the nucleus rule; sorts the whole vocabulary only when that never happens.
    """
    k = _FIRST_NUCLEUS_GUESS
    while k * 4 < probs.numel():  # past a quarter of the vocabulary a sort costs no more
        mass, ids = torch.topk(probs, k)
        if float(mass.sum()) >= top_p + _NUCLEUS_MARGIN:
            return _by_score(scaled, ids)
        k *= 8
    return _by_score(scaled, torch.arange(probs.numel()))


def _nucleus_size(probs: Tensor, outside_mass: float, top_p: float) -> int:
    """How many of the candidates (probs: [n], descending) the nucleus rule keeps.

    HF's rule: drop a token when its probability plus that of every less likely token
    (``outside_mass`` covers those not among the candidates) is <= 1 - top_p; keep at least one.
    """
    ascending_mass = outside_mass + probs.flip(0).cumsum(0)
    drop = ascending_mass <= 1 - top_p
    drop[-1] = False  # the most likely token always stays
    return probs.numel() - int(drop.sum())


def _by_score(scaled: Tensor, ids: Tensor) -> Tensor:
    """``ids`` ordered by descending score, ties by ascending id (argmax's choice first)."""
    ids = ids.sort().values
    return ids[torch.sort(scaled[ids], descending=True, stable=True).indices]


def _sample_row(scores: Tensor, params: SamplingParams, step: int) -> int:
    """Draw one token from a row's filtered distribution with the (seed, step) uniform."""
    ids = candidate_tokens(scores, params)
    probs = torch.softmax(scores[ids].double() / params.temperature, 0)
    cdf = probs.cumsum(0)
    target = _uniform(params.seed, step) * float(cdf[-1])
    pick = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64), right=True))
    if pick >= ids.numel():  # u * total rounded up to total
        pick = int(probs.nonzero().max())
    return int(ids[pick])


def _uniform(seed: int, step: int) -> float:
    """A number in [0, 1) that depends only on (seed, step): 53 bits of splitmix64."""
    return (_splitmix64(_splitmix64(seed) ^ step) >> 11) * 2.0**-53


def _splitmix64(value: int) -> int:
    """Steele, Lea and Flood's 64-bit finaliser: a bijective mix of the input's bits."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK_64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return z ^ (z >> 31)

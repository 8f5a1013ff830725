"""Run a token stream through a model one range of decoder layers at a time.

Calibration and evaluation read many sequences through every layer. Instead of loading the
whole model, :func:`run_in_passes` loads one range of layers (a stage's worth, built by
:func:`runtime.model.shard.load_shard` with each layer at its precision, exactly as a serving stage
is), runs every sequence through it, keeps the hidden states the range produced, frees the
range and loads the next. Only one range's weights are resident at any time; the hidden states
of all sequences are kept in host memory between passes: ``tokens × hidden_size × 4`` bytes
(61 k tokens of the built-in model: 47 MB; 262 k tokens of a 4096-wide model: 4.3 GB).

The token stream is cut into next-token windows as the built-in model's training script
measured its held-out perplexity: window ``k`` reads tokens ``[L·k, L·k + L)`` and predicts
tokens ``[L·k + 1, L·k + L + 1)``, so every token but the first is predicted exactly once, with
0 to L-1 tokens of context; the last window may be shorter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.errors import QuantizationError
from runtime.model.arch import ArchConfig
from runtime.model.memory import release_freed_host_memory
from runtime.model.shard import Impl, StageShard, StageSpec, load_shard

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)`` in micro-batch passes (micro-batches × layer ranges)."""
ShardHook = Callable[[StageShard], Callable[[], None]]
"""Called with each loaded range before sequences run through it; returns a function the
pass calls once every sequence went through that range (to remove hooks and gather results)."""


@dataclass(frozen=True)
class TokenWindows:
    """A token stream cut into next-token windows (module docstring).

    Attributes:
        batches: micro-batches of windows, token ids [windows, seq_len]; the shorter last
            window (if any) is a micro-batch of its own, [1, rest].
        targets: the tokens each window predicts, shaped as ``batches``.
        seq_len: L, tokens read per full window.
    """

    batches: tuple[Tensor, ...]
    targets: tuple[Tensor, ...]
    seq_len: int

    @property
    def predicted_tokens(self) -> int:
        """Tokens whose probability the windows score."""
        return sum(t.numel() for t in self.targets)


def token_windows(
    ids: Tensor, seq_len: int, micro_batch: int, max_tokens: int | None = None
) -> TokenWindows:
    """Cut ``ids`` [n] into windows of ``seq_len`` grouped in micro-batches of ``micro_batch``.

    Args:
        ids: 1-D token stream.
        seq_len: tokens per window (L).
        micro_batch: windows run together.
        max_tokens: score at most this many tokens (the first ones of the stream).

    Raises:
        ValueError: fewer than two tokens, or a non-positive size.
    """
    if seq_len < 1 or micro_batch < 1:
        raise ValueError("sequence length and micro-batch must be positive")
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError("the token count must be positive")
        ids = ids[: max_tokens + 1]
    if ids.numel() < 2:
        raise ValueError("the text has fewer than two tokens: nothing to predict")
    full = (ids.numel() - 1) // seq_len
    rows = ids[: full * seq_len + 1]
    inputs = rows[:-1].view(full, seq_len)
    targets = rows[1:].view(full, seq_len)
    batches = [inputs[b : b + micro_batch] for b in range(0, full, micro_batch)]
    target_batches = [targets[b : b + micro_batch] for b in range(0, full, micro_batch)]
    if full * seq_len < ids.numel() - 1:
        batches.append(ids[full * seq_len : -1].unsqueeze(0))
        target_batches.append(ids[full * seq_len + 1 :].unsqueeze(0))
    return TokenWindows(tuple(batches), tuple(target_batches), seq_len)


def layer_ranges(num_layers: int, layers_per_pass: int) -> list[tuple[int, int]]:
    """Half-open ranges of ``layers_per_pass`` consecutive layers covering the model."""
    if layers_per_pass < 1:
        raise ValueError("layers per pass must be positive")
    return [
        (start, min(start + layers_per_pass, num_layers))
        for start in range(0, num_layers, layers_per_pass)
    ]


@dataclass(frozen=True)
class PassResult:
    """What a full run scored.

    Attributes:
        nll_sum: summed next-token negative log-likelihood, nats.
        tokens: predicted tokens.
    """

    nll_sum: float
    tokens: int

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-likelihood)."""
        return float(torch.tensor(self.nll_sum / self.tokens).exp())


def run_in_passes(
    checkpoint_dir: Path,
    arch: ArchConfig,
    windows: TokenWindows,
    layer_bits: Sequence[int],
    *,
    layers_per_pass: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    impl: Impl = "auto",
    hook: ShardHook | None = None,
    progress: ProgressFn | None = None,
) -> PassResult:
    """Score ``windows`` with every layer at its precision, one layer range at a time.

    Args:
        checkpoint_dir: the Hugging Face checkpoint.
        arch: its architecture.
        windows: the token windows (:func:`token_windows`).
        layer_bits: precision of every decoder layer (16, 8, 4, 3, 2).
        layers_per_pass: decoder layers loaded together.
        group_size: quantization group size of the 2/3/4-bit layers.
        dtype: compute dtype of the layers.
        device: where the layers run.
        impl: "auto" (the serving kernels) or "reference" (dequantize per call, exact 16 bits).
        hook: called on each loaded range (see :data:`ShardHook`).
        progress: called after each micro-batch of each range.

    Raises:
        QuantizationError: ``layer_bits`` does not cover the model's layers.
        CheckpointError, StageMemoryError: as :func:`runtime.model.shard.load_shard`.
    """
    if len(layer_bits) != arch.num_layers:
        raise QuantizationError(
            f"{len(layer_bits)} precisions for a model with {arch.num_layers} layers"
        )
    ranges = layer_ranges(arch.num_layers, layers_per_pass)
    total, done = len(ranges) * len(windows.batches), 0
    states: list[Tensor] = list(windows.batches)
    micro_batch = max(b.shape[0] for b in windows.batches)
    nll, count = 0.0, 0
    for k, (start, stop) in enumerate(ranges):
        spec = StageSpec(
            layer_range=(start, stop),
            layer_bits=tuple(layer_bits[start:stop]),
            holds_embedding=k == 0,
            holds_lm_head=k == len(ranges) - 1,
            group_size=group_size,
            batch_slots=micro_batch,
            max_len=windows.seq_len,
        )
        shard = load_shard(checkpoint_dir, arch, spec, dtype=dtype, device=device, impl=impl)
        finish = hook(shard) if hook is not None else None
        for i, x in enumerate(states):
            out = _forward(shard, x)
            if spec.holds_lm_head:
                target = windows.targets[i].to(out.device)
                nll += F.cross_entropy(
                    out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="sum"
                ).item()
                count += target.numel()
                states[i] = x[:0]  # nothing further reads it
            else:
                states[i] = out.cpu()
            done += 1
            if progress is not None:
                progress(done, total)
        if finish is not None:
            finish()
        del shard  # the range's weights go before the next range loads
        release_freed_host_memory()
    return PassResult(nll, count)


def _forward(shard: StageShard, x: Tensor) -> Tensor:
    """One micro-batch of windows (token ids [bsz, seqlen] or hidden [bsz, seqlen, h])
    through the range, from position 0: hidden states, or fp32 logits [bsz, seqlen, vocab]."""
    bsz, seqlen = x.shape[0], x.shape[1]
    positions = torch.arange(seqlen).expand(bsz, seqlen)
    key_valid = torch.ones(bsz, seqlen, dtype=torch.bool)
    ctx = shard.context((0, bsz), 0, positions, key_valid)
    out: Tensor = shard(x, ctx, last_only=False)
    return out

"""Perplexity of a model under per-layer precisions, through the layers the runtime serves with.

Each decoder layer is built by :func:`runtime.model.shard.load_shard` at its precision (the same
quantizer, packed storage and kernels a serving stage uses) and the text is scored a layer
range at a time (:mod:`runtime.measure.passes`), so a model larger than memory can be evaluated.

Text. A text is tokenized with the checkpoint's tokenizer and starts with its BOS token (added
when the tokenizer does not add it itself; the built-in model's BOS is its end-of-text token,
which precedes every play in training). By default the text is the built-in model's held-out
play (Hamlet, never trained on), split in two parts so that the text that fits the
perplexity-to-ω mapping is not the text that confirms it:

- the *calibration* part: the play's first :data:`CALIBRATION_TOKENS` predicted tokens, read by
  ``pqctl calibrate``;
- the *evaluation* part: every later token (about 45 k for the built-in tokenizer), scored by
  default by ``pqctl eval``;
- ``all``: the whole play, as the training script measured the built-in model's held-out
  perplexity (67.89 at 16 bits).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from runtime.errors import CheckpointError
from runtime.measure.passes import PassResult, ProgressFn, run_in_passes, token_windows
from runtime.model.arch import ArchConfig, arch_from_config, read_config
from runtime.model.corpus import held_out_play
from runtime.model.memory import available_bytes
from runtime.model.shard import Impl, linear_shapes
from runtime.model.stages import compute_dtype
from runtime.model.tokenizer import load_tokenizer

TextPart = Literal["calibration", "evaluation", "all"]
CALIBRATION_TOKENS = 16384
"""Predicted tokens of the held-out play's calibration part (128 windows of 128 tokens)."""
DEFAULT_SEQ_LEN = 128
DEFAULT_MICRO_BATCH = 8


def text_token_ids(checkpoint_dir: Path, text: str) -> Tensor:
    """Token ids [n] of ``text`` under the checkpoint's tokenizer, starting with its BOS token.

    Raises:
        CheckpointError: the checkpoint has no tokenizer.
    """
    tokenizer, _pad, eos = load_tokenizer(checkpoint_dir)
    # As Tokenizer.encode, without the warning about texts longer than the model's context.
    ids: list[int] = list(tokenizer.backend(text, verbose=False)["input_ids"])
    bos = getattr(tokenizer.backend, "bos_token_id", None)
    start = bos if bos is not None else (eos[0] if eos else None)
    if start is not None and (not ids or ids[0] != start):
        ids = [int(start), *ids]
    return torch.tensor(ids, dtype=torch.long)


def held_out_ids(checkpoint_dir: Path, part: TextPart) -> Tensor:
    """Token ids of a part of the built-in model's held-out play (module docstring)."""
    ids = text_token_ids(checkpoint_dir, held_out_play()[1])
    if part == "calibration":
        return ids[: CALIBRATION_TOKENS + 1]
    if part == "evaluation":
        if ids.numel() <= CALIBRATION_TOKENS + 1:
            raise CheckpointError(
                f"the held-out play has only {ids.numel()} tokens under this tokenizer: no "
                "evaluation part after the calibration part; pass a text file"
            )
        return ids[CALIBRATION_TOKENS:]
    return ids


def default_group_size(arch: ArchConfig, candidates: tuple[int, ...] = (128, 64, 32)) -> int:
    """Largest group size dividing every linear operator's input width (the planner's rule)."""
    widths = [cols for _rows, cols in linear_shapes(arch).values()]
    return next((g for g in candidates if all(w % g == 0 for w in widths)), candidates[0])


def default_layers_per_pass(
    arch: ArchConfig, device: torch.device, dtype: torch.dtype = torch.float32
) -> int:
    """Layers loaded together: all of them when their dense weights take at most half of the
    device's free memory, else as many as fit in that half (at least one)."""
    layer_bytes = sum(r * c for r, c in linear_shapes(arch).values()) * dtype.itemsize
    fit = available_bytes(device) // 2 // max(layer_bytes, 1)
    return max(1, min(arch.num_layers, int(fit)))


def evaluate_perplexity(
    checkpoint_dir: Path,
    token_ids: Tensor,
    layer_bits: Sequence[int],
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
    group_size: int | None = None,
    micro_batch: int = DEFAULT_MICRO_BATCH,
    layers_per_pass: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    impl: Impl = "auto",
    progress: ProgressFn | None = None,
) -> PassResult:
    """Perplexity of ``token_ids`` [n] with decoder layer i at ``layer_bits[i]`` bits.

    Args:
        checkpoint_dir: the Hugging Face checkpoint.
        token_ids: the token stream (:func:`text_token_ids`, :func:`held_out_ids`).
        layer_bits: precision of every decoder layer.
        seq_len: tokens per window (:mod:`runtime.measure.passes`).
        max_tokens: score only the first this many predicted tokens.
        group_size: quantization group size (default: :func:`default_group_size`).
        micro_batch: windows run together.
        layers_per_pass: layers loaded together (default: :func:`default_layers_per_pass`).
        device: where the layers run; dtype: their compute dtype (fp32 on CPUs, bf16/fp16 on
            GPUs by default, as a serving stage).
        impl: "auto" (the serving kernels) or "reference".
        progress: ``progress(done, total)`` per micro-batch and layer range.

    Raises:
        CheckpointError, QuantizationError, StageMemoryError, ValueError (an empty text).
    """
    arch = arch_from_config(read_config(checkpoint_dir), str(checkpoint_dir))
    dev = torch.device(device)
    compute = dtype or compute_dtype(dev)
    windows = token_windows(token_ids, seq_len, micro_batch, max_tokens)
    return run_in_passes(
        checkpoint_dir,
        arch,
        windows,
        layer_bits,
        layers_per_pass=layers_per_pass or default_layers_per_pass(arch, dev),
        group_size=group_size or default_group_size(arch),
        dtype=compute,
        device=dev,
        impl=impl,
        progress=progress,
    )

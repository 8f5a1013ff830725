"""GPT-2 checkpoints, read through the OPT layout the stage code already serves.

GPT-2 is OPT's layer structure (pre-norm LayerNorms with biases, learned positions, an
unprojected FFN, biases everywhere) with other tensor names, Conv1D weights stored ``[in, out]``
(transposed from ``nn.Linear``), one fused ``c_attn`` projection for q, k and v, learned
positions without OPT's offset of 2, and the tanh-approximated GELU. :class:`Gpt2Checkpoint`
presents a GPT-2 checkpoint under OPT's names (``model.decoder.*``): each virtual tensor is
read from its GPT-2 tensor (sliced and transposed as needed) only when asked for, so a stage
still reads only its own layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import torch

from runtime.errors import CheckpointError
from runtime.model.checkpoint import Checkpoint, TensorInfo

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class _Virtual:
    source: str
    transform: Transform
    shape: tuple[int, ...]


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


def _part(index: int, hidden: int, transpose: bool) -> Transform:
    """Slice ``index`` (q 0, k 1, v 2) of a fused c_attn weight [h, 3h] or bias [3h]."""

    def take(w: torch.Tensor) -> torch.Tensor:
        part = w[..., index * hidden : (index + 1) * hidden]
        return part.t().contiguous() if transpose else part.contiguous()

    return take


def _same(w: torch.Tensor) -> torch.Tensor:
    return w


class Gpt2Checkpoint(Checkpoint):
    """A GPT-2 checkpoint's tensors under OPT's names (the module docstring)."""

    def __init__(self, base: Checkpoint, num_layers: int, hidden: int) -> None:
        # not Checkpoint.__init__: the tensors are the base's, under other names
        self.base, self.directory = base, base.directory
        self.virtual: dict[str, _Virtual] = {}
        prefix = "transformer." if "transformer.wte.weight" in base.tensors else ""

        def add(name: str, source: str, transform: Transform, shape: Iterable[int]) -> None:
            if prefix + source in base.tensors:
                self.virtual[name] = _Virtual(prefix + source, transform, tuple(shape))

        def shape_of(source: str) -> tuple[int, ...]:
            info = base.tensors.get(prefix + source)
            return info.shape if info else ()

        add("model.decoder.embed_tokens.weight", "wte.weight", _same, shape_of("wte.weight"))
        add("model.decoder.embed_positions.weight", "wpe.weight", _same, shape_of("wpe.weight"))
        for part in ("weight", "bias"):
            add(f"model.decoder.final_layer_norm.{part}", f"ln_f.{part}", _same, (hidden,))
        if "lm_head.weight" in base.tensors:  # untied (outside the "transformer." prefix)
            head = base.tensors["lm_head.weight"]
            self.virtual["lm_head.weight"] = _Virtual("lm_head.weight", _same, head.shape)
        for layer in range(num_layers):
            ours, theirs = f"model.decoder.layers.{layer}.", f"h.{layer}."
            for k, short in enumerate(("q", "k", "v")):
                add(f"{ours}self_attn.{short}_proj.weight", f"{theirs}attn.c_attn.weight",
                    _part(k, hidden, True), (hidden, hidden))  # fmt: skip
                add(f"{ours}self_attn.{short}_proj.bias", f"{theirs}attn.c_attn.bias",
                    _part(k, hidden, False), (hidden,))  # fmt: skip
            for ours_name, theirs_name in (
                ("self_attn.out_proj", "attn.c_proj"),
                ("fc1", "mlp.c_fc"),
                ("fc2", "mlp.c_proj"),
            ):
                stored = shape_of(f"{theirs}{theirs_name}.weight")
                add(f"{ours}{ours_name}.weight", f"{theirs}{theirs_name}.weight", _t,
                    tuple(reversed(stored)))  # fmt: skip
                add(f"{ours}{ours_name}.bias", f"{theirs}{theirs_name}.bias", _same,
                    shape_of(f"{theirs}{theirs_name}.bias"))  # fmt: skip
            for ours_name, theirs_name in (("self_attn_layer_norm", "ln_1"),
                                           ("final_layer_norm", "ln_2")):  # fmt: skip
                for part in ("weight", "bias"):
                    add(f"{ours}{ours_name}.{part}", f"{theirs}{theirs_name}.{part}", _same,
                        (hidden,))  # fmt: skip
        self.tensors: dict[str, TensorInfo] = {
            name: replace(base.tensors[v.source], shape=v.shape) for name, v in self.virtual.items()
        }

    def require(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Check that every named tensor exists with the expected shape (as OPT names it)."""
        for name, shape in shapes.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(
                    f"{self.directory}: GPT-2 tensor for {name} is missing (a GPT-2 checkpoint "
                    "saved by transformers holds transformer.h.N.attn.c_attn.weight, ...)"
                )
            if info.shape != shape:
                raise CheckpointError(
                    f"{info.file}: tensor {self.virtual[name].source} gives {name} of shape "
                    f"{list(info.shape)}, expected {list(shape)}"
                )

    def dtype_of(self, name: str) -> torch.dtype | None:
        return self.base.dtype_of(self.virtual[name].source)

    def read(self, name: str) -> torch.Tensor:
        virtual = self.virtual[name]
        return virtual.transform(self.base.read(virtual.source))

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self.read(name) for name in names}

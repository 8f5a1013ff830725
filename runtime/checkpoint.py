"""Reading a Hugging Face safetensors checkpoint tensor by tensor.

Headers are parsed first (names, shapes, dtypes, byte offsets), so a missing tensor, a wrong
shape or a truncated file is reported before any weight is loaded; then only the tensors a
stage asks for are read (memory-mapped), never the whole model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.errors import CheckpointError

_HEADER_LIMIT = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives and what it is."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check the file holds every byte it announces."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated (no safetensors header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_HEADER_LIMIT, size - 8):
                raise CheckpointError(f"{path}: truncated or not a safetensors file")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        data_end = max(data_end, int(entry["data_offsets"][1]))
        infos[name] = TensorInfo(path, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: {size} bytes, the header announces {8 + header_len + data_end}"
        )
    return infos


class Checkpoint:
    """The tensors of a checkpoint directory, indexed by name across its safetensors files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files():
            self.tensors.update(_read_header(file))

    def _files(self) -> list[Path]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: unreadable shard index ({exc})") from exc
            files = sorted({self.directory / name for name in weight_map.values()})
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{missing[0]}: missing (listed in {index.name})")
            return files
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{self.directory}: no *.safetensors weights (PyTorch .bin checkpoints are not "
                "read; re-save the model with save_pretrained(safe_serialization=True))"
            )
        return files

    def require(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Check that every named tensor exists with the expected shape."""
        for name, shape in shapes.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.directory}: tensor {name} is missing")
            if info.shape != shape:
                raise CheckpointError(
                    f"{info.file}: tensor {name} has shape {list(info.shape)}, expected "
                    f"{list(shape)}"
                )

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (and nothing else) into CPU memory."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in wanted:
                    out[name] = f.get_tensor(name)
        return out

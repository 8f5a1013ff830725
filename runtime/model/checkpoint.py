"""Reading a Hugging Face safetensors checkpoint tensor by tensor.

Headers are parsed first (names, shapes, dtypes, byte offsets), so a missing tensor, a wrong
shape or a truncated file is reported before any weight is loaded; then only the tensors a
stage asks for are read, one at a time, never the whole model.

Each tensor is read from its byte range straight into memory it owns (no memory map): a tensor
dropped by the loader gives its memory back at once, and no mapping of the file keeps the pages
it touched resident. safetensors' own ``get_tensor`` returns views of a private mapping of the
whole file, which lives (with every page read through it) as long as any tensor from it does.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from runtime.errors import CheckpointError

_HEADER_LIMIT = 100 * 1024 * 1024

DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
)
"""torch dtype of each safetensors dtype name the reader understands."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives and what it is.

    Attributes:
        file: the safetensors file holding it.
        dtype: safetensors dtype name, e.g. ``"F32"``.
        shape: its shape.
        offset: position of its first byte in ``file``, bytes.
        nbytes: length of its data, bytes.
    """

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


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
        begin, end = (int(x) for x in entry["data_offsets"])
        data_end = max(data_end, end)
        info = TensorInfo(
            path,
            str(entry["dtype"]),
            tuple(int(d) for d in entry["shape"]),
            8 + header_len + begin,
            end - begin,
        )
        _check_extent(info, name)
        infos[name] = info
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path}: truncated: {size} bytes, the header announces {8 + header_len + data_end}"
        )
    return infos


def _check_extent(info: TensorInfo, name: str) -> None:
    """The byte range the header gives a tensor fits its shape and dtype."""
    dtype = DTYPES.get(info.dtype)
    if dtype is None:
        return  # reported when (if ever) the tensor is read
    expected = math.prod(info.shape) * dtype.itemsize
    if info.nbytes != expected:
        raise CheckpointError(
            f"{info.file}: corrupt safetensors header: tensor {name} spans {info.nbytes} bytes, "
            f"its shape {list(info.shape)} of {info.dtype} needs {expected}"
        )


def _read_exactly(path: Path, offset: int, buffer: memoryview) -> None:
    """Fill ``buffer`` with the bytes of ``path`` from ``offset`` on."""
    with path.open("rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(buffer):
            count = f.readinto(buffer[done:])
            if not count:
                raise CheckpointError(f"{path}: truncated while reading at byte {offset + done}")
            done += count


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

    def dtype_of(self, name: str) -> torch.dtype | None:
        """torch dtype a named tensor is stored in (None for a dtype :meth:`read` refuses)."""
        return DTYPES.get(self.tensors[name].dtype)

    def read(self, name: str) -> torch.Tensor:
        """Read one named tensor into CPU memory that it owns (nothing else is read).

        Raises:
            CheckpointError: the tensor's dtype is not one of :data:`DTYPES`, the file got
                shorter since its header was read, or the machine is big-endian.
        """
        info = self.tensors[name]
        dtype = DTYPES.get(info.dtype)
        if dtype is None:
            known = ", ".join(DTYPES)
            raise CheckpointError(
                f"{info.file}: tensor {name} has dtype {info.dtype}; readable dtypes: {known}"
            )
        if sys.byteorder != "little":
            raise CheckpointError("safetensors files are little-endian; this machine is not")
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        _read_exactly(info.file, info.offset, raw.numpy().data)
        return raw.view(dtype).view(info.shape)

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (and nothing else) into CPU memory, one at a time."""
        return {name: self.read(name) for name in names}

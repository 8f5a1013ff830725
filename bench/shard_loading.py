"""Peak memory of loading one stage shard vs loading the whole model, in the same run.

Builds a random-weight Llama checkpoint (hidden 1024, 16 layers, fp32: about 0.9 GB on disk)
once in a temporary directory, then in fresh subprocesses measures the peak resident set of
(a) the whole model through transformers' ``from_pretrained``, (b) pqctl's loader for all 16
layers, and (c) pqctl's loader for a 4-layer middle stage at 16 and at 4 bits. The ratio (c)/(b)
shows that a stage reads only its own tensors (transformers memory-maps the file and touches
pages lazily, so its peak is printed for reference only). For pqctl's loader it also prints what
the shard holds once loaded (``StageShard.resident_bytes``) and the transient above that (peak
above the baseline, less what is held): the loading overhead. The last line is the 4-bit stage's
peak above baseline over the 16-bit stage's: 16-bit weights are bf16 on a CPU with native bf16
(see ``runtime.quant.kernels``), fp32 elsewhere.

``--quick`` is a smoke-size run of the same measurements: hidden 512, 8 layers (about 0.1 GB),
the middle stage layers 3-4.

Usage: python bench/shard_loading.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Shape:
    """The random-weight Llama checkpoint and the middle stage loaded from it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    stage: tuple[int, int]
    """The middle stage's layers [start, stop)."""


FULL = Shape(1024, 2816, 16, 16, 8, 32000, (6, 10))
QUICK = Shape(512, 1408, 8, 8, 4, 8000, (3, 5))

MAKE = """
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
torch.manual_seed(0)
config = LlamaConfig(hidden_size={hidden}, intermediate_size={intermediate},
                     num_hidden_layers={layers}, num_attention_heads={heads},
                     num_key_value_heads={kv_heads}, vocab_size={vocab},
                     max_position_embeddings=1024, tie_word_embeddings=False)
AutoModelForCausalLM.from_config(config).save_pretrained({path!r})
"""

BASELINE = """
import resource, torch
import runtime.model.shard, transformers
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base * 1024)
"""

WHOLE_HF = """
import resource, torch
import runtime.model.shard
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

STAGE = """
import resource, torch
from pathlib import Path
import transformers
from runtime.model.arch import arch_from_config, read_config
from runtime.model.shard import StageSpec, load_shard
path = Path({path!r})
arch = arch_from_config(read_config(path), str(path))
start, stop = {layers}
spec = StageSpec((start, stop), ({bits},) * (stop - start), start == 0, stop == arch.num_layers,
                 128, 1, 64)
shard = load_shard(path, arch, spec)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, shard.resident_bytes())
"""


def measure(code: str) -> tuple[int, int | None]:
    """Peak resident set of a fresh interpreter running ``code``, and the bytes the shard it
    loaded holds (None when it loads none), bytes."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    fields = out.stdout.strip().splitlines()[-1].split()
    return int(fields[0]), int(fields[1]) if len(fields) > 1 else None


def stage(path: str, layers: tuple[int, int], bits: int) -> tuple[int, int | None]:
    """Peak and held bytes of pqctl's loader for ``layers`` at ``bits``."""
    return measure(STAGE.format(path=path, layers=layers, bits=bits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-size run: hidden 512, 8 layers")
    shape = QUICK if parser.parse_args().quick else FULL
    n, (first, stop) = shape.layers, shape.stage
    middle = f"layers {first}-{stop - 1}"
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / f"llama-{n}l")
        make = MAKE.format(path=path, **{k: v for k, v in asdict(shape).items() if k != "stage"})
        subprocess.run([sys.executable, "-c", make], cwd=ROOT, check=True, timeout=600)
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        base, _ = measure(BASELINE)
        rows = [
            ("whole model, transformers from_pretrained", measure(WHOLE_HF.format(path=path))),
            (f"whole model, pqctl loader ({n} layers, 16-bit)", stage(path, (0, n), 16)),
            (f"middle stage, pqctl loader ({middle}, 16-bit)", stage(path, shape.stage, 16)),
            (f"middle stage, pqctl loader ({middle}, 4-bit)", stage(path, shape.stage, 4)),
        ]
    print_table(size, base, rows)


def print_table(size: int, base: int, rows: list[tuple[str, tuple[int, int | None]]]) -> None:
    """One line per measurement, in GiB, then the 4-bit / 16-bit stage ratio."""
    gib = 1024**3
    print(
        f"checkpoint {size / gib:.2f} GiB on disk; interpreter + libraries alone "
        f"{base / gib:.2f} GiB peak"
    )
    whole = rows[1][1][0] - base  # transformers maps the file lazily: its RSS is not comparable
    header = f"{'what':<50} {'peak GiB':>9} {'above base':>11} {'held':>6} {'transient':>10}"
    print(f"{header} {'÷ whole':>8}")
    for name, (peak, held) in rows:
        above = peak - base
        kept = "-" if held is None else f"{held / gib:.2f}"
        extra = "-" if held is None else f"{(above - held) / gib:.2f}"
        print(
            f"{name:<50} {peak / gib:>9.2f} {above / gib:>11.2f} {kept:>6} {extra:>10} "
            f"{above / whole:>8.2f}"
        )
    ratio = (rows[3][1][0] - base) / (rows[2][1][0] - base)
    print(f"middle stage peak above base, 4-bit / 16-bit: {ratio:.2f}")


if __name__ == "__main__":
    main()

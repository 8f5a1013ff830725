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

Usage: python bench/shard_loading.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE = """
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
torch.manual_seed(0)
config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
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
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "llama-16l")
        subprocess.run(
            [sys.executable, "-c", MAKE.format(path=path)], cwd=ROOT, check=True, timeout=600
        )
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        base, _ = measure(BASELINE)
        rows = [
            ("whole model, transformers from_pretrained", measure(WHOLE_HF.format(path=path))),
            ("whole model, pqctl loader (16 layers, 16-bit)", stage(path, (0, 16), 16)),
            ("middle stage, pqctl loader (layers 6-9, 16-bit)", stage(path, (6, 10), 16)),
            ("middle stage, pqctl loader (layers 6-9, 4-bit)", stage(path, (6, 10), 4)),
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

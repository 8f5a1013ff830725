"""Loading a stage: only its own tensors, and clear errors before anything half-loads."""

from __future__ import annotations

import json
import shutil
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPTNeoXConfig

from planner import cost_model as cm
from planner.catalogue import cpu_device_type
from planner.cluster import ClusterSpec, DeviceSpec, HostSpec
from planner.indicator import prior_indicator
from planner.local_host import cpu_has_native_bf16, cpu_has_packed_kernels, measure_local_cpu
from planner.make_plan import make_plan
from planner.model_spec import load_model_spec
from planner.plan import Plan, Workload
from planner.problem import PlanningProblem
from runtime.errors import (
    CheckpointError,
    PlanMismatchError,
    StageMemoryError,
    UnsupportedArchitectureError,
)
from runtime.model import shard as shard_module
from runtime.model.arch import arch_from_config, read_config
from runtime.model.assets import builtin_model_dir
from runtime.model.checkpoint import Checkpoint
from runtime.model.shard import StageSpec, end_tensors, estimate_bytes, load_shard
from runtime.model.source import resolve_checkpoint
from runtime.model.stages import load_plan_stage
from runtime.quant import kernels
from tests.runtime.model.checkpoints import save_checkpoint, tiny_configs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tiny_configs()["llama"], tmp_path_factory.mktemp("llama"))


def spec(layers: tuple[int, int], first: bool, last: bool, bits: int = 16) -> StageSpec:
    return StageSpec(layers, (bits,) * (layers[1] - layers[0]), first, last, 32, 2, 16)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_middle_stage_reads_only_its_layers(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    original = Checkpoint.read

    def spy(self: Checkpoint, name: str) -> torch.Tensor:
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(Checkpoint, "read", spy)
    arch = arch_from_config(read_config(llama), "llama")
    load_shard(llama, arch, spec((1, 3), first=False, last=False))
    assert read and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in read)
    assert {n.split(".")[2] for n in read} == {"1", "2"}


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_a_linear_weight_is_gone_before_the_next_is_read(
    llama: Path, monkeypatch: pytest.MonkeyPatch, bits: int
) -> None:
    """Quantize while streaming: each linear weight read from the checkpoint is released once
    its layer is built, before the next one is read."""
    weights: list[weakref.ref[torch.Tensor]] = []
    live_at_each_read: list[int] = []
    original = Checkpoint.read

    def spy(self: Checkpoint, name: str) -> torch.Tensor:
        tensor = original(self, name)
        if tensor.dim() == 2:
            live_at_each_read.append(sum(ref() is not None for ref in weights))
            weights.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(Checkpoint, "read", spy)
    arch = arch_from_config(read_config(llama), "llama")
    load_shard(llama, arch, spec((1, 3), first=False, last=False, bits=bits))
    assert len(live_at_each_read) == 2 * 7  # two layers of seven linears
    assert live_at_each_read == [0] * 14


def test_a_tensor_read_owns_its_memory(llama: Path) -> None:
    checkpoint = Checkpoint(llama)
    reference = load_file(llama / "model.safetensors")
    for name in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        tensor = checkpoint.read(name)
        assert torch.equal(tensor, reference[name])
        assert tensor.untyped_storage().nbytes() == tensor.nbytes  # not a view of a file map


def test_a_header_whose_byte_range_does_not_fit_the_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, path)
    data = bytearray(path.read_bytes())
    header = data[8 : 8 + int.from_bytes(data[:8], "little")].decode()
    data[8 : 8 + len(header)] = header.replace('"shape":[4,4]', '"shape":[4,2]').encode()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor w spans 64 bytes, its shape"):
        Checkpoint(tmp_path)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    config = GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        vocab_size=64,
    )  # fmt: skip
    directory = save_checkpoint(config, tmp_path / "neox")
    with pytest.raises(UnsupportedArchitectureError) as err:
        arch_from_config(read_config(directory), str(directory))
    assert str(err.value) == (
        f'unsupported architecture "gpt_neox" in {directory}; supported: bloom, gpt2, llama, '
        "mistral, opt, qwen2"
    )


def test_missing_weights_file(llama: Path, tmp_path: Path) -> None:
    directory = tmp_path / "empty"
    directory.mkdir()
    shutil.copy(llama / "config.json", directory)
    arch = arch_from_config(read_config(directory), "x")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        load_shard(directory, arch, spec((0, 4), True, True))


def test_truncated_file_fails_before_loading(llama: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(llama, tmp_path / "cut")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    arch = arch_from_config(read_config(directory), "x")
    with pytest.raises(CheckpointError) as err:
        load_shard(directory, arch, spec((0, 1), True, False))
    assert str(err.value) == (
        f"{weights}: truncated: {len(data) - 1000} bytes, the header announces {len(data)}"
    )


def test_missing_tensor_is_named(llama: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(llama, tmp_path / "holes")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    arch = arch_from_config(read_config(directory), "x")
    load_shard(directory, arch, spec((0, 2), True, False))  # layers 0-1 are intact
    with pytest.raises(CheckpointError) as err:
        load_shard(directory, arch, spec((2, 4), False, True))
    assert str(err.value) == f"{directory}: tensor model.layers.2.mlp.up_proj.weight is missing"


def test_wrong_shape_is_named(llama: Path, tmp_path: Path) -> None:
    directory = copy_checkpoint(llama, tmp_path / "shape")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    arch = arch_from_config(read_config(directory), "x")
    with pytest.raises(
        CheckpointError,
        match=r"q_proj.weight has shape \[32, 64\], expected "
        r"\[64, 64\]",
    ):
        load_shard(directory, arch, spec((0, 1), True, False))


def test_stage_that_does_not_fit_fails_before_reading(
    llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shard_module, "available_bytes", lambda device: 1000)

    def never(self: Checkpoint, name: str) -> torch.Tensor:
        raise AssertionError("weights were read although the stage cannot fit")

    monkeypatch.setattr(Checkpoint, "read", never)
    arch = arch_from_config(read_config(llama), "x")
    with pytest.raises(StageMemoryError, match=r"layers 0–3 need 0\.00 GiB on cpu"):
        load_shard(llama, arch, spec((0, 4), True, True))


def plan_for(model_source: str) -> Plan:
    """A real plan for ``model_source`` on one 8 GiB CPU."""
    model = load_model_spec(model_source)
    cpu = cpu_device_type(
        cores=2, memory_bytes=8 * 1024**3, memory_bandwidth_gb_s=10, fp32_tflops=0.1
    )
    cluster = ClusterSpec("test", (HostSpec("here"),), (DeviceSpec("here", -1, cpu),))
    problem = PlanningProblem(
        model=model,
        cluster=cluster,
        workload=Workload(2, 8, 4, 4),
        indicator=prior_indicator(model, 32),
        group_size=32,
    )
    return make_plan(problem)


def test_plan_for_another_model_is_refused(llama: Path) -> None:
    plan = plan_for("opt-13b")
    with pytest.raises(PlanMismatchError) as err:
        load_plan_stage(plan, 0, checkpoint=llama)
    assert str(err.value) == (
        f"the plan's model.family is opt but the checkpoint {llama} has llama; re-plan for "
        "this model"
    )


def test_plan_stage_loads_on_the_planned_device(llama: Path) -> None:
    plan = plan_for(str(llama))
    shard = load_plan_stage(plan, 0)
    assert shard.device == torch.device("cpu")
    assert shard.spec.layer_range == (0, 4)
    assert shard.cache.keys[0].shape == (2, 2, 12, 16)  # slots = batch, length = s + n


def test_checkpoint_sources_resolve(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_checkpoint(str(llama)) == llama
    assert resolve_checkpoint(str(llama / "config.json")) == llama
    assert resolve_checkpoint("bard-tiny").name == "bard-tiny"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not a local directory and the hub"):
        resolve_checkpoint("nobody/no-such-model")


# --------------------------------------------------------------------------- memory agreement

BARD_STAGES = [
    ((2, 6), False, False),
    ((0, 3), True, False),
    ((5, 8), False, True),
    ((0, 8), True, True),  # both ends of a tied model: one embedding matrix
]


def test_the_planner_reads_the_same_bf16_flag_as_the_runtime() -> None:
    assert cpu_has_native_bf16() == kernels._cpu_has_native_bf16()
    cpu = measure_local_cpu()
    assert cpu.dense_weight_bytes == kernels.dense_weight_dtype(torch.float32, CPU).itemsize


def test_the_planner_counts_2_and_3_bits_fast_where_the_runtime_has_their_kernels() -> None:
    runtime_has = {
        kernels.choose_kernel_path(bits, 4096, 4096, 128, CPU).startswith("native")
        for bits in (3, 2)
    }
    assert runtime_has == {cpu_has_packed_kernels()}
    fast = measure_local_cpu().fast_kernel_bits
    assert ({2, 3} <= fast) == cpu_has_packed_kernels()


def test_without_a_compiler_or_with_the_switch_off_2_and_3_bits_count_as_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu avx512f avx512bw avx512_bf16 avx512vbmi\n")
    monkeypatch.delenv("CC", raising=False)
    compiler = shutil.which("gcc") or shutil.which("cc")
    assert cpu_has_packed_kernels(cpuinfo) == (compiler is not None)
    monkeypatch.setenv("PQCTL_NATIVE_KERNELS", "0")
    assert not cpu_has_packed_kernels(cpuinfo)
    monkeypatch.delenv("PQCTL_NATIVE_KERNELS")
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    assert not cpu_has_packed_kernels(cpuinfo)
    cpuinfo.write_text("flags : fpu avx512f avx512bw avx512_bf16\n")  # no avx512_vbmi
    monkeypatch.setenv("CC", sys.executable)  # a program that exists
    assert not cpu_has_packed_kernels(cpuinfo)


@pytest.fixture(scope="module")
def bard_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in model saved as a bf16 checkpoint (as most published checkpoints are)."""
    directory = copy_checkpoint(builtin_model_dir(), tmp_path_factory.mktemp("ckpt") / "bf16")
    weights = directory / "model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    config = read_config(directory) | {"torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def _planned_bytes(
    native_bf16: bool, layers: tuple[int, int], first: bool, last: bool, directory: Path
) -> int:
    """The planner's memory for a 16-bit stage (batch 2, 64 tokens) on a CPU."""
    model = load_model_spec(directory)
    cpu = cpu_device_type(cores=2, memory_bytes=8 * 1024**3, memory_bandwidth_gb_s=10,
                          fp32_tflops=0.1, native_bf16=native_bf16)  # fmt: skip
    planned = (layers[1] - layers[0]) * cm.layer_memory_bytes(model, cpu, 16, 2, 64, 64)
    ends = cm.weight16_bytes(model, cpu)  # embedding table and LM head: as 16-bit weights
    planned += first * cm.embedding_bytes(model, ends)
    planned -= (first and last) * cm.tied_saving_bytes(model, ends)
    return planned + last * cm.head_bytes(model, 0, ends)  # no logits buffer


@pytest.mark.parametrize("checkpoint", ["fp32", "bf16"])
@pytest.mark.parametrize("native_bf16", [False, True])
@pytest.mark.parametrize(("layers", "first", "last"), BARD_STAGES)
def test_planner_memory_matches_a_loaded_16_bit_stage(
    monkeypatch: pytest.MonkeyPatch,
    bard_bf16: Path,
    checkpoint: str,
    native_bf16: bool,
    layers: tuple[int, int],
    first: bool,
    last: bool,
) -> None:
    """The planner's bytes for a 16-bit stage on a CPU with (or without) native bf16 are what
    the runtime holds once the stage is loaded there (its probe forced to the same answer).
    An fp32 checkpoint's 16-bit layers are fp32 on either CPU; a bf16 one's are bf16 only where
    the CPU has native bf16, so there the other CPU's count is not what it holds."""
    monkeypatch.setattr(kernels, "_cpu_has_native_bf16", lambda: native_bf16)
    directory = builtin_model_dir() if checkpoint == "fp32" else bard_bf16
    arch = arch_from_config(read_config(directory), "bard-tiny")
    stage = StageSpec(layers, (16,) * (layers[1] - layers[0]), first, last, 64, 2, 64)
    held = load_shard(directory, arch, stage).resident_bytes()
    assert held == pytest.approx(_planned_bytes(native_bf16, layers, first, last, directory), 0.05)
    other = _planned_bytes(not native_bf16, layers, first, last, directory)
    if checkpoint == "fp32":
        assert other == _planned_bytes(native_bf16, layers, first, last, directory)
    else:
        assert held != pytest.approx(other, rel=0.05)


@pytest.mark.parametrize("bits", [16, 8, 4, 3])
@pytest.mark.parametrize(("layers", "first", "last"), BARD_STAGES)
def test_the_shard_estimate_matches_what_it_holds(
    bits: int, layers: tuple[int, int], first: bool, last: bool
) -> None:
    directory = builtin_model_dir()
    arch = arch_from_config(read_config(directory), "bard-tiny")
    stage = StageSpec(layers, (bits,) * (layers[1] - layers[0]), first, last, 64, 2, 64)
    shard = load_shard(directory, arch, stage)
    ends = end_tensors(arch, Checkpoint(directory), first, last)
    estimate = estimate_bytes(arch, stage, ends, torch.float32, CPU, torch.float32)
    assert shard.resident_bytes() == pytest.approx(estimate, rel=0.01)


def test_progress_counts_layers_then_the_end_part(llama: Path) -> None:
    arch = arch_from_config(read_config(llama), str(llama))
    seen: list[tuple[int, int]] = []
    load_shard(llama, arch, spec((0, 2), True, False), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]  # two layers, then the embedding
    seen.clear()
    load_shard(llama, arch, spec((1, 2), False, False), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 1), (1, 1)]  # a middle stage has no end part

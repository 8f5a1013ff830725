"""From a plan to loaded stage shards: find the checkpoint, check the plan describes it, and
load one stage on its device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from planner.plan import Plan
from runtime.errors import CheckpointError, PlanMismatchError
from runtime.model.arch import ArchConfig, arch_from_config, read_config
from runtime.model.assets import BUILTIN_MODEL_NAME, builtin_model_dir
from runtime.model.shard import Impl, StageShard, StageSpec, load_shard


def resolve_checkpoint(source: str) -> Path:
    """The checkpoint directory a plan's ``model.source`` names: the built-in model, a local
    directory (or its config.json), or a hub id downloaded where a hub is reachable."""
    if source == BUILTIN_MODEL_NAME:
        return builtin_model_dir()
    path = Path(source).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        return path
    if source.count("/") == 1 and not path.exists():
        return _download(source)
    raise CheckpointError(f"{source}: no such checkpoint directory")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # any hub failure: offline, unknown repo, auth
        raise CheckpointError(
            f"{repo_id}: not a local directory and the hub could not provide it "
            f"({type(exc).__name__}); download it elsewhere and pass its directory"
        ) from exc


def check_plan_matches(plan: Plan, arch: ArchConfig, source: str) -> None:
    """Raise PlanMismatchError when the plan was made for another model shape."""
    model = plan.model
    pairs = (
        ("family", model.family, arch.family),
        ("num_layers", model.num_layers, arch.num_layers),
        ("hidden_size", model.hidden_size, arch.hidden_size),
        ("intermediate_size", model.intermediate_size, arch.intermediate_size),
        ("num_heads", model.num_heads, arch.num_heads),
        ("num_kv_heads", model.num_kv_heads, arch.num_kv_heads),
        ("vocab_size", model.vocab_size, arch.vocab_size),
    )
    for name, planned, actual in pairs:
        if planned != actual:
            raise PlanMismatchError(
                f"the plan's model.{name} is {planned} but the checkpoint {source} has "
                f"{actual}; re-plan for this model"
            )


def stage_spec(plan: Plan, index: int) -> StageSpec:
    """The shard description of the plan's stage ``index``."""
    stage = plan.stages[index]
    return StageSpec(
        layer_range=(stage.layer_range.start, stage.layer_range.stop),
        layer_bits=stage.layer_bits,
        holds_embedding=stage.holds_embedding,
        holds_lm_head=stage.holds_lm_head,
        group_size=plan.quantization.group_size,
        batch_slots=plan.workload.global_batch,
        max_len=plan.workload.max_context,
    )


def stage_device(plan: Plan, index: int) -> torch.device:
    """torch device of the plan's stage on its host: cuda:N, or cpu for index -1."""
    ref = plan.stages[index].device
    return torch.device("cpu") if ref.index < 0 else torch.device("cuda", ref.index)


def compute_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPUs (fast GEMMs there); bf16 on GPUs that support it, else fp16."""
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_plan_stage(
    plan: Plan,
    index: int,
    *,
    checkpoint: Path | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    impl: Impl = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> StageShard:
    """Load stage ``index`` of ``plan`` (checkpoint and device default to the plan's);
    ``progress(done, total)`` as in :func:`runtime.model.shard.load_shard`."""
    directory = checkpoint or resolve_checkpoint(plan.model.source)
    arch = arch_from_config(read_config(directory), str(directory))
    check_plan_matches(plan, arch, str(directory))
    dev = device or stage_device(plan, index)
    return load_shard(
        directory,
        arch,
        stage_spec(plan, index),
        dtype=dtype or compute_dtype(dev),
        device=dev,
        impl=impl,
        progress=progress,
    )

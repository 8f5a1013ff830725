"""From a plan to loaded stage shards: find the checkpoint, check the plan describes it, and
load one stage on its device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from planner.plan import Plan
from runtime.model.shard import Impl, StageShard, StageSpec, load_shard
from runtime.model.source import checked_checkpoint


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
    directory, arch = checked_checkpoint(plan, checkpoint)
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

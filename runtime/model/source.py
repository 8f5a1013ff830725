"""A plan's ``model.source``: where its checkpoint is, and whether the plan describes it.

Stdlib only (no torch): ``pqctl apply`` checks a plan against its checkpoint before it starts
any process, and the gateway and every stage check it again where they run.
"""

from __future__ import annotations

from pathlib import Path

from planner.plan import Plan
from runtime.errors import CheckpointError, PlanMismatchError
from runtime.model.arch import ArchConfig, arch_from_config, read_config
from runtime.model.assets import BUILTIN_MODEL_NAME, builtin_model_dir


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
    if is_hub_id(source):
        return _download(source)
    raise CheckpointError(f"{source}: no such checkpoint directory")


def is_hub_id(source: str) -> bool:
    """Whether ``source`` reads as a hub id (``org/name``) rather than a path found here."""
    if source == BUILTIN_MODEL_NAME:
        return False
    path = Path(source).expanduser()
    return source.count("/") == 1 and not path.exists() and not source.startswith(("/", "."))


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
        ("family", model.family, arch.plan_family or arch.family),
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


def checked_checkpoint(plan: Plan, directory: Path | None = None) -> tuple[Path, ArchConfig]:
    """The plan's checkpoint directory (``directory`` when given, else found from
    ``model.source``) and its architecture, once the plan is checked to describe it.

    Raises:
        CheckpointError: no such checkpoint, or an unreadable config.json.
        UnsupportedArchitectureError: a family no stage serves.
        PlanMismatchError: the plan was made for another model shape.
    """
    directory = directory or resolve_checkpoint(plan.model.source)
    arch = arch_from_config(read_config(directory), str(directory))
    check_plan_matches(plan, arch, str(directory))
    return directory, arch

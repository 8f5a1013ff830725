"""Errors the runtime raises. Each carries a short ``title`` and a message saying what to do."""

from __future__ import annotations


class RuntimeFailure(Exception):
    """Base class of every error the runtime raises on bad input or a failed operation."""

    title = "runtime error"

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


class UnsupportedArchitectureError(RuntimeFailure):
    """The checkpoint's architecture has no stage implementation."""

    title = "unsupported architecture"


class CheckpointError(RuntimeFailure):
    """A checkpoint file is missing, truncated, or lacks a tensor the stage needs."""

    title = "bad checkpoint"


class PlanMismatchError(RuntimeFailure):
    """The plan does not describe this checkpoint (layer count, family, sizes)."""

    title = "plan does not match the model"


class StageMemoryError(RuntimeFailure):
    """The stage would not fit the device's free memory."""

    title = "stage does not fit"


class QuantizationError(RuntimeFailure):
    """A precision or group size the quantized layers cannot represent."""

    title = "cannot quantize"

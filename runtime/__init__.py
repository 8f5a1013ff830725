"""The stage runtime: torch, transformers and pyzmq; never an interface library or ``pqctl``,
and of the planner only ``planner.plan``. In rooms: ``quant`` (packed weights and kernels)
under ``model`` (what computes), under ``serve`` (what runs a deployment) and ``measure``
(profiles, calibration, perplexity); ``cluster`` (device discovery); ``errors`` for them all.
"""

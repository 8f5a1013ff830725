"""The ``pqctl`` dashboard (Textual): cluster, plans, launch, live per-stage throughput, prompts.

Entry point: :func:`pqctl.tui.app.run_dashboard`. Imported lazily by the CLI, so that the
headless commands never load Textual. Imports Textual, the planner, :mod:`pqctl.plan_inputs`
and ``runtime.serve``'s client, monitor, deployment state and gateway launch; never the
commands.
"""

"""The ``pqctl`` dashboard (Textual): cluster, plans, launch, live per-stage throughput, prompts.

Entry point: :func:`pqctl.tui.app.run_dashboard`. Imported lazily by the CLI, so that the
headless commands never load Textual.
"""

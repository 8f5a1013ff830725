"""The ``pqctl`` commands, one module per group: ``plan`` (plan, show), ``serve`` (apply,
generate, stop, keys), ``profile``, ``quality`` (calibrate, eval). Each parses its options,
calls one piece of work (in ``pqctl``, ``planner`` or ``runtime``) and renders the result;
the dashboard (``pqctl.tui``) never imports them.
"""

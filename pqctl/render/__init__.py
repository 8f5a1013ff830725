"""Rich renderings the commands print: a plan with its baselines, a deployment's stages while
they load and while they serve. Imports rich, ``planner.plan`` and ``runtime.serve``'s monitor.
"""

"""What runs a deployment: the client protocol and the stage data frames, the gateway and its
scheduler, sampling and text streaming, stage workers and their launcher, the deployment's
state file, its monitor, CURVE keys, and the Python client. Imports ``runtime.model`` (stage
workers hold shards), ``runtime.errors`` and ``planner.plan``; never ``runtime.measure``. The
client side (client, protocol, deployment, keys) imports neither torch nor numpy.
"""

"""An operator's requests to a running deployment's gateway, on its control socket (the one its
stages use; it admits only the deployment's own keys, which the operator's tools on this host
read from the state directory).

``cancel_request`` ends one request of any client, as that client's own ``cancel`` would: its
client gets the ``done`` reply with ``finish_reason`` ``"cancelled"``. The dashboard's Requests
view uses it. No torch here.
"""

from __future__ import annotations

import msgpack
import zmq

from runtime.serve.deployment import DeploymentState
from runtime.serve.keys import CurveKeys, secure_client

OPERATOR_IDENTITY = b"operator"
"""The control-socket identity of an operator's tool, told apart from the stages'."""


class OperatorError(RuntimeError):
    """The deployment's control socket is unknown or cannot be reached with this user's keys."""


def cancel_request(state: DeploymentState, client: str, request_id: str) -> None:
    """Ask the gateway to cancel request ``request_id`` of the client connection whose id ends
    in ``client`` (the ``client`` field of the status's ``request_list``). Nothing happens if
    that request has finished meanwhile.

    Raises:
        OperatorError: the state names no control endpoint (a deployment of an older pqctl) or
            its keys cannot be read.
    """
    if not state.control_endpoint:
        raise OperatorError(f'deployment "{state.name}" does not name its control socket')
    try:
        directory = state.monitor_keys_dir()
        keys = CurveKeys.load(directory, "client") if directory else None
    except ValueError as exc:
        raise OperatorError(str(exc)) from exc
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, OPERATOR_IDENTITY)
        sock.setsockopt(zmq.LINGER, 2000)  # long enough to deliver, never forever
        secure_client(sock, keys)
        sock.connect(state.control_endpoint)
        message = {"type": "cancel", "client": client, "id": request_id}
        sock.send(msgpack.packb(message, use_bin_type=True))
        sock.close()
    finally:
        ctx.term()

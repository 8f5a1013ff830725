"""ZeroMQ CURVE keys of a deployment: encryption and peer authentication on every socket.

A key directory (``pqctl keys init DIR``) holds::

    server.key, server.key_secret   the keypair of every binding socket (gateway, stages)
    client.key, client.key_secret   the keypair of the deployment's own connecting sockets
    authorized/                     public keys allowed to connect (client.key to begin with;
                                    copy a user's ``*.key`` here to admit their client)

That directory is the *client* role: the gateway's client endpoint uses ``server.key`` and
admits the public keys in ``authorized/``, and nothing else. Every deployment started with keys
also gets a key directory of its own (:func:`deployment_keys`, same layout, created fresh under
the state directory, mode 0700): its *internal* role, which the gateway's internal sockets
(control, results, status), every stage's sockets (data, metrics) and the operator's tools on
this host (``pqctl apply``'s table, ``pqctl status``, the dashboard) use, and which admits only
its own ``client.key``. A client key therefore reaches the client endpoint only: it cannot
connect to a stage or forge a stage's message. A ZAP authenticator runs in every process that
binds; the gateway's tells the two roles apart by ZAP domain. Without keys, sockets are plain
TCP: fine on loopback for one user, not across hosts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

CLIENT_DOMAIN = "client"
"""ZAP domain of the gateway's client endpoint (the operator's ``authorized/``)."""
INTERNAL_DOMAIN = "internal"
"""ZAP domain of every other socket of a deployment (the deployment's own keys)."""


class KeyError_(ValueError):
    """A key directory that is missing a file or holds an unreadable key."""


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """The keys one process uses: its own keypair per role and the server's public key."""

    server_public: bytes
    server_secret: bytes | None
    client_public: bytes
    client_secret: bytes
    authorized: Path

    @classmethod
    def load(cls, directory: Path, role: str = "stage") -> CurveKeys:
        """Read a key directory. ``role`` "client" needs only the client and server public
        keys; "stage" (anything that binds) also needs the server's secret key."""
        directory = Path(directory)
        server_public = _public(directory / "server.key")
        server_secret = None
        if role != "client":
            server_secret = _secret(directory / "server.key_secret")
        client_public, client_secret = _pair(directory / "client.key_secret")
        return cls(
            server_public, server_secret, client_public, client_secret, directory / "authorized"
        )


def init_keys(directory: Path) -> list[Path]:
    """Create a deployment's key directory; returns the files written.

    Raises:
        FileExistsError: keys exist already (never overwritten).
    """
    directory = Path(directory)
    if (directory / "server.key_secret").exists():
        raise FileExistsError(f"{directory} already holds keys; remove it to create new ones")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    server_public, server_secret = zmq.auth.create_certificates(str(directory), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(directory), "client")
    authorized = directory / "authorized"
    authorized.mkdir(exist_ok=True)
    shutil.copy(client_public, authorized / "client.key")
    for secret in (server_secret, client_secret):
        Path(secret).chmod(0o600)
    return [Path(p) for p in (server_public, server_secret, client_public, client_secret)]


def deployment_keys(directory: Path, reuse: bool = False) -> Path:
    """The deployment's own key directory at ``directory`` (its internal role): created fresh,
    replacing what was there, unless ``reuse`` and it holds keys already (a restarted gateway
    keeps the keys its stages' successors and the operator's tools use)."""
    directory = Path(directory)
    if reuse and (directory / "client.key_secret").exists():
        return directory
    if directory.exists():
        shutil.rmtree(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    init_keys(directory)
    return directory


def _public(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"{path}: cannot read a CURVE public key ({exc})") from None
    return public


def _pair(path: Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"{path}: cannot read a CURVE keypair ({exc})") from None
    if secret is None:
        raise KeyError_(f"{path}: holds no secret key")
    return public, secret


def _secret(path: Path) -> bytes:
    return _pair(path)[1]


def secure_server(
    sock: zmq.Socket[Any], keys: CurveKeys | None, domain: str = INTERNAL_DOMAIN
) -> None:
    """Make a binding socket a CURVE server of ``domain`` (call before bind); no-op without
    keys."""
    if keys is None:
        return
    assert keys.server_secret is not None, "a binding socket needs the server secret key"
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True
    sock.zap_domain = domain.encode()


def secure_client(sock: zmq.Socket[Any], keys: CurveKeys | None) -> None:
    """Make a connecting socket a CURVE client of the deployment (call before connect)."""
    if keys is None:
        return
    sock.curve_secretkey = keys.client_secret
    sock.curve_publickey = keys.client_public
    sock.curve_serverkey = keys.server_public


def start_authenticator(
    ctx: zmq.Context[Any], keys: CurveKeys | None, clients: CurveKeys | None = None
) -> ThreadAuthenticator | None:
    """Admit, on this context's CURVE server sockets, the public keys in ``keys``'s
    ``authorized/`` on internal sockets, and those in ``clients``'s on client-domain ones."""
    if keys is None:
        return None
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain=INTERNAL_DOMAIN, location=str(keys.authorized))
    if clients is not None:
        auth.configure_curve(domain=CLIENT_DOMAIN, location=str(clients.authorized))
    return auth

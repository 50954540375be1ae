"""CURVE encryption and a ZAP allow-list for SegDepth Live sockets, and the loopback rule.

A key folder (made by ``segdepth keys DIR``) holds ``server.key`` / ``server.key_secret`` (the
binding side of every link), ``client.key`` / ``client.key_secret`` (the connecting side) and
``allowed/`` (public keys of the clients a server lets in; ``client.key`` is put there). Every
process finds the folder in ``$SEGDEPTH_KEYS`` (the ``--keys DIR`` option of a command sets
it). A socket that binds a non-loopback address without keys is refused unless
``$SEGDEPTH_INSECURE=1`` (``--insecure``).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

KEYS_ENV = "SEGDEPTH_KEYS"
INSECURE_ENV = "SEGDEPTH_INSECURE"
SCHEMES = ("tcp", "ipc", "inproc")

_auth_lock = threading.Lock()
_authenticators: dict[int, Any] = {}  # per context: the running ZAP handler (ThreadAuthenticator)


class EndpointError(ValueError):
    """An endpoint that cannot be used as given (the message names it and the fix)."""


def split_endpoint(endpoint: str) -> tuple[str, str]:
    """(scheme, address) of ``endpoint``; EndpointError when it has no known scheme."""
    scheme, sep, address = endpoint.partition("://")
    if not sep or scheme not in SCHEMES or not address:
        raise EndpointError(
            f"endpoint {endpoint!r} has no scheme: write it as "
            f"tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555"
        )
    return scheme, address


def is_loopback(endpoint: str) -> bool:
    """True for ipc/inproc endpoints and tcp on 127.0.0.0/8, ::1 or ``localhost``."""
    scheme, address = split_endpoint(endpoint)
    if scheme != "tcp":
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name, '*' or a host name: not loopback
        return False


@dataclass(frozen=True)
class Keys:
    """The CURVE keys of a key folder (z85 bytes) and its allow-list folder."""

    folder: Path
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @property
    def allowed(self) -> Path:
        return self.folder / "allowed"

    @classmethod
    def load(cls, folder: str | Path) -> Keys:
        import zmq.auth

        folder = Path(folder)
        try:
            sp, ss = zmq.auth.load_certificate(folder / "server.key_secret")
            cp, cs = zmq.auth.load_certificate(folder / "client.key_secret")
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"{folder} is not a key folder ({exc}); make one with `segdepth keys {folder}`"
            ) from None
        if ss is None or cs is None:
            raise FileNotFoundError(
                f"{folder}: a *.key_secret file holds no secret key; make "
                f"the folder again with `segdepth keys {folder} --force`"
            )
        return cls(folder, sp, ss, cp, cs)


def make_keys(folder: str | Path, overwrite: bool = False) -> Keys:
    """Create a key folder (server and client key pairs, ``allowed/client.key``)."""
    import zmq.auth

    folder = Path(folder)
    if (folder / "server.key_secret").exists() and not overwrite:
        raise FileExistsError(
            f"{folder} already holds keys; pass --force to replace them "
            f"(every peer then needs the new ones)"
        )
    (folder / "allowed").mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        zmq.auth.create_certificates(str(folder), name)
    os.chmod(folder / "server.key_secret", 0o600)
    os.chmod(folder / "client.key_secret", 0o600)
    shutil.copy(folder / "client.key", folder / "allowed" / "client.key")
    return Keys.load(folder)


def keys_from_env() -> Keys | None:
    folder = os.environ.get(KEYS_ENV)
    return Keys.load(folder) if folder else None


def _start_zap(ctx: zmq.Context, keys: Keys) -> None:
    """One ZAP handler per context, admitting the public keys in ``keys.allowed``."""
    from zmq.auth.thread import ThreadAuthenticator

    with _auth_lock:
        if id(ctx) in _authenticators:
            return
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(keys.allowed))
        _authenticators[id(ctx)] = auth


def stop_zap(ctx: zmq.Context) -> None:
    """Stop the ZAP handler of ``ctx`` (before the context is destroyed)."""
    with _auth_lock:
        auth = _authenticators.pop(id(ctx), None)
    if auth is not None:
        auth.stop()


def secure_server(sock: zmq.Socket, endpoint: str, keys: Keys | None = None) -> bool:
    """Before a bind: CURVE server with the allow-list when keys exist (True); else refuse a
    non-loopback endpoint unless insecure operation was asked for (False)."""
    keys = keys if keys is not None else keys_from_env()
    if keys is None:
        if not is_loopback(endpoint) and os.environ.get(INSECURE_ENV) != "1":
            raise EndpointError(
                f"refusing to bind {endpoint} without encryption: it is reachable from other "
                f"machines. Make keys with `segdepth keys DIR` and pass --keys DIR to every "
                f"program (or set {KEYS_ENV}=DIR), or pass --insecure on a private network"
            )
        return False
    _start_zap(sock.context, keys)
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.curve_server = True
    return True


def secure_client(sock: zmq.Socket, keys: Keys | None = None) -> bool:
    """Before a connect: CURVE client keys when a key folder is configured (True: the peer
    is authenticated by its server key)."""
    keys = keys if keys is not None else keys_from_env()
    if keys is None:
        return False
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret
    return True


def add_options(parser) -> None:
    """``--keys DIR`` and ``--insecure`` on a command that opens sockets."""
    parser.add_argument(
        "--keys",
        metavar="DIR",
        default=None,
        help=f"CURVE key folder made by `segdepth keys DIR`: encrypt every "
        f"link and admit only the keys in DIR/allowed (sets {KEYS_ENV})",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow binding a non-loopback address without keys (a private network only)",
    )


def apply_options(args) -> None:
    """Make ``--keys``/``--insecure`` apply to every socket of this process."""
    if getattr(args, "keys", None):
        Keys.load(args.keys)  # fails now, naming the folder, rather than at the first bind
        os.environ[KEYS_ENV] = str(args.keys)
    if getattr(args, "insecure", False):
        os.environ[INSECURE_ENV] = "1"

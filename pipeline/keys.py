"""ZeroMQ CURVE keys for the publisher and its subscribers (pyzmq's `zmq.auth`).

The publisher holds a key pair (`server.key_secret`) and admits only the subscribers whose public
key is in a folder (`clients/*.key`); the connection is encrypted. `run.py keys` makes the files in
the layout zmq.auth reads:

    keys/server.key            the publisher's public key: give it to every subscriber
    keys/server.key_secret     the publisher's key pair: stays on the server (mode 0600)
    keys/clients/NAME.key      a subscriber's public key: the publisher lets it in
    keys/NAME.key_secret       that subscriber's key pair: give it to that subscriber only

Key material never reaches a log, a message or an error: errors name the file, never its content.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from pipeline.config import PublishKeys
from pipeline.errors import ConfigError, UsageError


def make_keys(folder: Path, clients: list[str]) -> list[Path]:
    """Make the server's key pair (unless there is one) and one pair per client name; returns the
    files written. An existing client pair is kept: keys already handed out stay valid."""
    folder = Path(folder)
    (folder / "clients").mkdir(parents=True, exist_ok=True)
    written = []
    names = ([] if (folder / "server.key_secret").exists() else ["server"]) + list(clients)
    for name in names:
        if name != "server" and (folder / f"{name}.key_secret").exists():
            continue
        public, secret = zmq.auth.create_certificates(str(folder), name)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
        if name != "server":  # the publisher admits what is in clients/
            shutil.copy(public, folder / "clients" / f"{name}.key")
            written.append(folder / "clients" / f"{name}.key")
    return written


def _load(path: Path, want_secret: bool, what: str, error=ConfigError) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise error(f"{what}: {path}: file not found (make keys with `run.py keys`)")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError, KeyError):
        raise error(f"{what}: {path}: not a ZeroMQ certificate (make keys with `run.py keys`)") from None
    if want_secret and not secret:
        raise error(f"{what}: {path}: holds no secret key (use the .key_secret file)") from None
    if not public:
        raise error(f"{what}: {path}: holds no public key") from None
    return public, secret


class CurveServer:
    """CURVE on a publishing socket: the server's keys, and a ZAP handler (a thread on the socket's
    context) that admits the public keys found in `keys.clients`. `reload()` re-reads that folder
    (SIGHUP), so a subscriber is admitted or shut out without a restart."""

    def __init__(self, context: zmq.Context, keys: PublishKeys):
        self.keys = keys
        self.public, self.secret = self.check(keys)
        self.authenticator = ThreadAuthenticator(context)
        self.authenticator.start()
        self.reload()

    @staticmethod
    def check(keys: PublishKeys) -> tuple[bytes, bytes]:
        """The server's key pair; ConfigError (one line, no key material) for what is missing or wrong."""
        pair = _load(keys.server, True, "publish.keys.server")
        if not keys.clients.is_dir():
            raise ConfigError(f"publish.keys.clients: {keys.clients}: not a folder (of the subscribers' public keys)")
        return pair

    def reload(self) -> int:
        """Admit the public keys now in the clients folder; returns how many."""
        self.authenticator.configure_curve(domain="*", location=str(self.keys.clients))
        return len(list(self.keys.clients.glob("*.key")))

    def secure(self, socket: zmq.Socket) -> None:
        """Make `socket` a CURVE server (before it binds)."""
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def stop(self) -> None:
        """Before the context is terminated: the handler's socket would hold `term` forever."""
        if self.authenticator.is_alive():
            self.authenticator.stop()


def secure_client(socket: zmq.Socket, server_key: str | None, client_key: str | None) -> None:
    """A subscriber's side: the publisher's public key and this subscriber's key pair (both or
    neither: without them the socket connects in the clear, which a publisher with keys refuses)."""
    if server_key is None and client_key is None:
        return
    if server_key is None or client_key is None:
        raise UsageError("--server-key and --client-key go together (the publisher's server.key and your .key_secret)")
    server_public, _ = _load(Path(server_key), False, "--server-key", UsageError)
    public, secret = _load(Path(client_key), True, "--client-key", UsageError)
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret

"""Who may touch a memory node over ZeroMQ: CURVE keys, and the rules for plaintext.

A memory node exposes raw memory, so over ``tcp://`` it speaks only CURVE (authenticated,
encrypted): each MN has a keypair whose public half is in the cluster config, and it accepts a
client only if that client's public key is among the authorized ones in
``<keys_dir>/clients/``; the list is re-read whenever that directory changes, so authorizing a
client needs no restart. A refused key is logged (a warning naming it) by the server, and the
client learns of the refusal from its socket's monitor (``refusal``), at once rather than
after its timeout. ``ipc://`` is protected by the file system instead (owner-only socket
and segment). Plaintext TCP is refused unless the config opts in, and then it warns.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

import zmq
import zmq.auth

from fusee.config import ClusterConfig, ConfigError, MemNodeConfig
from fusee.errors import NotAuthorized

logger = logging.getLogger(__name__)
#: the socket-monitor events of a failed CURVE handshake
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL |
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


log = logging.getLogger(__name__)

#: the master's key name in keys_dir: master.key_secret / master.key
MASTER_KEY = "master"


class InsecureEndpointError(ConfigError):
    """A tcp:// endpoint without CURVE and without the explicit opt-in."""


def check_endpoint(config: ClusterConfig, endpoint: str, who: str) -> None:
    """Refuse plaintext TCP unless opted in; warn when it is."""
    if not endpoint.startswith("tcp://") or config.security.curve:
        return
    if not config.security.allow_insecure_tcp:
        raise InsecureEndpointError(
            f"{who}: {endpoint} is tcp:// without CURVE: anyone who reaches the port could read "
            "or overwrite every key. Enable [security] curve = true (see `fusee keys init`), or "
            "set [security] allow_insecure_tcp = true to accept the risk.")
    log.warning("%s: %s is plaintext and unauthenticated (security.allow_insecure_tcp = true)",
                who, endpoint)


# -- keys -----------------------------------------------------------------------------------
def _secret_file(keys_dir: str | Path, name: str) -> Path:
    return Path(keys_dir) / f"{name}.key_secret"


def init_keys(keys_dir: str | Path, memnodes: int, clients: list[str]) -> dict[int, str]:
    """Create a keypair per MN and per named client; authorize the clients.

    Returns each MN's public key (Z85) for the cluster config. Secret files are owner-only.
    """
    keys = Path(keys_dir)
    (keys / "clients").mkdir(parents=True, exist_ok=True)
    os.chmod(keys, 0o700)
    publics = {}
    for i in range(memnodes):
        publics[i] = _public(_create(keys, f"mn{i}"))
    for name in clients:
        add_client(keys, name)
    return publics


def add_client(keys_dir: str | Path, name: str) -> Path:
    """Create a client keypair and authorize it; returns its secret certificate's path."""
    keys = Path(keys_dir)
    secret = _create(keys, name)
    public = keys / f"{name}.key"
    (keys / "clients" / public.name).write_bytes(public.read_bytes())
    return secret


def init_master_key(keys_dir: str | Path) -> str:
    """Create the master's keypair and authorize it with the MNs (the master is their client
    too: heartbeats, failovers, recoveries); returns its public key (Z85)."""
    return _public(add_client(keys_dir, MASTER_KEY))


def master_config(config: ClusterConfig) -> ClusterConfig:
    """``config`` as the master uses it: towards the MNs it authenticates with its own
    keypair (``init_master_key``), so its host needs no client's secret."""
    if not config.security.curve or not config.security.keys_dir:
        return config
    own = str(_secret_file(config.security.keys_dir, MASTER_KEY))
    return config.with_(security=replace(config.security, client_key=own))


def _public(secret_file: Path) -> str:
    public, _ = zmq.auth.load_certificate(str(secret_file))
    return public.decode()


def _create(keys: Path, name: str) -> Path:
    if _secret_file(keys, name).exists():
        raise FileExistsError(f"{_secret_file(keys, name)} exists; refusing to overwrite a key")
    old = os.umask(0o077)
    try:
        _, secret = zmq.auth.create_certificates(str(keys), name)
    finally:
        os.umask(old)
    return Path(secret)


# -- sockets --------------------------------------------------------------------------------
class _AuthorizedKeys:
    """ZAP credentials provider: the public keys in a directory, re-read when it changes."""

    def __init__(self, directory: Path, server: str):
        self.dir, self.server = directory, server
        self.lock = threading.Lock()
        self.stamp: int | None = None
        self.keys: set[bytes] = set()
        self.refused: set[bytes] = set()       # logged once each (a client retries often)

    def callback(self, domain: str, key: bytes) -> bool:
        with self.lock:
            try:
                stamp = self.dir.stat().st_mtime_ns
            except OSError:
                stamp = None
            if stamp != self.stamp:
                self.keys = set(zmq.auth.load_certificates(str(self.dir))) if stamp else set()
                self.stamp = stamp
                self.refused.clear()
            if key in self.keys:
                return True
            if key not in self.refused:
                self.refused.add(key)
                logger.warning("%s refused a client whose CURVE public key %s is not authorized: "
                               "to admit it, put its public .key file into %s", self.server,
                               key.decode(errors="replace"), self.dir)
            return False


def secure_server(ctx: zmq.Context, sock: zmq.Socket, config: ClusterConfig,
                  node_id: int, key_name: str | None = None):
    """Make ``sock`` (before bind) a CURVE server that admits only authorized clients.
    Its keypair is ``mn<node_id>``, or ``key_name`` for another server (the master). Returns
    the authenticator thread to stop at exit, or None without CURVE."""
    if not config.security.curve:
        return None
    # imported here: it pulls in asyncio, seconds of start-up on a slow (emulated) machine
    from zmq.auth.thread import ThreadAuthenticator
    keys = config.security.keys_dir
    if not keys:
        raise ConfigError("security.curve needs security.keys_dir")
    secret_file = _secret_file(keys, key_name or f"mn{node_id}")
    if not secret_file.is_file():
        make = ("`fusee keys init-master --dir KEYS_DIR` makes it" if key_name == MASTER_KEY else
                "`fusee keys init` made it; copy it from there to this host")
        raise ConfigError(f"{secret_file} is missing: this server's secret key must be there "
                          f"({make}; see docs/deploy.md)")
    public, secret = zmq.auth.load_certificate(str(secret_file))
    auth = ThreadAuthenticator(ctx)
    auth.start()
    server = key_name or f"MN {node_id}"
    auth.configure_curve_callback(
        "*", credentials_provider=_AuthorizedKeys(Path(keys) / "clients", server))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def secure_client(sock: zmq.Socket, config: ClusterConfig, node: MemNodeConfig) -> str | None:
    """Make ``sock`` (before connect) a CURVE client of ``node`` with this client's key;
    returns its public key (Z85), which a refusal names."""
    if not config.security.curve:
        check_endpoint(config, node.endpoint, "client")
        return None
    path = os.environ.get("FUSEE_CLIENT_KEY") or config.security.client_key
    if not path:
        raise ConfigError("security.curve needs a client key: security.client_key in the config "
                          "or FUSEE_CLIENT_KEY in the environment (see `fusee keys add-client`)")
    if not node.curve_public:
        raise ConfigError(f"memory node {node.id} has no curve_public key in the config")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ConfigError(f"{path} holds no secret key (pass the .key_secret file)")
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = node.curve_public.encode()
    return public.decode()


def refusal(monitor: zmq.Socket, public: str, server: str, endpoint: str,
            node: int | None = None) -> NotAuthorized | None:
    """The NotAuthorized to raise if a socket's ``monitor`` (``HANDSHAKE_FAILED`` events)
    reports that the server refused our CURVE handshake (our key: ``public``); None if it
    reported nothing."""
    from zmq.utils.monitor import recv_monitor_message
    while True:
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return None
        if event["event"] & HANDSHAKE_FAILED:
            return NotAuthorized(
                f"{server} at {endpoint} refused this client's CURVE key {public}: authorize "
                "it on the servers (its public .key file in their keys_dir/clients/, e.g. "
                "from `fusee keys add-client`), and check that the config has the server's "
                "public key", node)

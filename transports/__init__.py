"""Client-side verb backends behind one interface (``fusee.transports.base.Transport``)."""

from __future__ import annotations

import importlib
import inspect

from fusee.config import ClusterConfig, ConfigError

#: backend name -> "module:class"; modules are imported only when that backend is asked for,
#: so a laptop without pyverbs never touches it.
BACKENDS = {
    "local": "fusee.transports.local:LocalTransport",
    "shm": "fusee.transports.shm:ShmTransport",
    "zmq": "fusee.transports.zeromq:ZmqTransport",
    "verbs": "fusee.transports.rdma:VerbsTransport",
}


def connect(config: ClusterConfig, backend: str | None = None, dead=(),
            identity: bytes | None = None, populate: bool = True, **kwargs):
    """Open a transport of the named backend (default: the cluster config's) to every MN.

    ``dead``: MNs known to be dead (the master's membership); they are not contacted, and
    requests to them fail at once with NodeTimeout. The shm and zmq backends also connect when
    some other MN does not answer (it is then treated the same way); the others take no
    ``dead`` and need every MN. ``identity``: a leased client's (``fusee.fencing``), for the
    backends the MNs can fence (zmq, verbs); the others have no use for it. ``populate``:
    the shm backend maps each MN's region with all its pages at once (the default, for a
    client that runs a while) or, False, each on first touch (for one that exits soon:
    ``ShmTransport``); the others map no region."""
    name = backend or config.transport
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        # (a ConfigError, a ValueError: a typo in the config or --transport exits 2, not 5)
        raise ConfigError(f"unknown transport {name!r}; choose one of {sorted(BACKENDS)}"
                          ) from None
    factory = getattr(importlib.import_module(module), cls)
    parameters = inspect.signature(factory).parameters
    if dead and "dead" in parameters:
        kwargs["dead"] = dead
    if identity is not None and "identity" in parameters:
        kwargs["identity"] = identity
    if not populate and "populate" in parameters:
        kwargs["populate"] = populate
    return factory(config, **kwargs)

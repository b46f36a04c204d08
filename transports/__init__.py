"""Client-side verb backends behind one interface (``transports.base.Transport``)."""

from __future__ import annotations

import importlib

from fusee.config import ClusterConfig

#: backend name -> "module:class"; modules are imported only when that backend is asked for,
#: so a laptop without pyverbs never touches it.
BACKENDS = {
    "local": "transports.local:LocalTransport",
    "shm": "transports.shm:ShmTransport",
    "zmq": "transports.zeromq:ZmqTransport",
    "verbs": "transports.rdma:VerbsTransport",
}


def connect(config: ClusterConfig, backend: str | None = None, **kwargs):
    """Open a transport of the named backend (default: the cluster config's) to every MN."""
    name = backend or config.transport
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; choose one of {sorted(BACKENDS)}") from None
    return getattr(importlib.import_module(module), cls)(config, **kwargs)

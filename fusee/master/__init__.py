"""The master: MN membership, client leases, failovers, repairs and rebuilds
(docs/design.md#the-master).

Off the data path. ``logic``: the sans-IO decisions; ``server``: the process that feeds them
(RPCs, heartbeats, the worker); ``store``: its persistent state (a file or ZooKeeper);
``election``: which of several masters leads; ``link``: a client's side (RPCs and the lease).
"""

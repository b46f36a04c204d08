"""The master: MN membership, client leases, failovers, repairs and rebuilds
(docs/design.md#the-master).

Off the data path. ``logic``: the sans-IO decisions; ``server``: the process that feeds them,
made of one class per thread (``rpc``: the requests, ``heartbeat``: the MN pings, ``worker``:
failovers, recoveries and rebuilds) over what they share (``shared``), started by
``command`` (`fusee master`); ``store``: its persistent state (a file or ZooKeeper);
``election``: which of several masters leads; ``protocol``: its wire protocol; ``link``: a
client's side of it (RPCs and the lease).
"""

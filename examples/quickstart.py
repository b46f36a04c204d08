"""Start a local cluster of three memory-node processes and use the store.

    python examples/quickstart.py [shm|zmq|local]
"""

import sys

from fusee import Client, LocalCluster
from fusee.errors import KeyExists

backend = sys.argv[1] if len(sys.argv) > 1 else "shm"
with LocalCluster(memnodes=3, transport=backend) as cluster:
    with cluster.client() as kv:
        kv.insert(b"greeting", b"hello")
        try:
            kv.insert(b"greeting", b"again")
        except KeyExists:
            print("insert of an existing key raises KeyExists")
        kv.update(b"greeting", b"hello, disaggregated world")
        print("get  ->", kv.get(b"greeting"))
        kv.put(b"counter", b"1")                  # insert or update
        kv.delete(b"greeting")
        print("after delete ->", kv.get(b"greeting"))

        if backend != "local":                    # another client, as another process would
            with Client.connect(cluster.config_path) as other:
                print("other client sees counter =", other.get(b"counter"))

        s = kv.stats
        print(f"{s['round_trips']} round trips, {s['verbs']} verbs, "
              f"{s['bytes_out']} B out / {s['bytes_in']} B in, "
              f"cache hits {s['cache_hits']}, retries {s['retries']}")

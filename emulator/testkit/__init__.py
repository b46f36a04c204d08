"""Test tooling, apart from the product: what proves the store correct (docs/design.md#testing).

The deterministic simulator and its lease simulation, the history recorder and the
linearizability checker, the index check, the fuzz targets, and a throwaway ZooKeeper
ensemble for the masters' tests. Nothing in the product imports it.
"""

"""Benchmarks: the verbs layer (``verbs``), YCSB workloads and the baselines they compare with.

Unlike the core modules of ``fusee``, benchmarks start clusters and talk to the network.
"""

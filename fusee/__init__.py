"""fusee: a fully memory-disaggregated key-value store (after FUSEE, USENIX FAST 2023)."""

"""Apoptosis worker: runs pruning jobs. `worker.engine` is the pure pruning library."""

"""The coordinator: defines a run, leases shards to peers over gRPC, keeps the ledger and checkpoints."""

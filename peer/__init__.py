"""The volunteer peer: registers, leases shards, trains them with hivemind, submits results."""

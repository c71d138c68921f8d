"""Load and measurement: the workload (one or several processes), faults, the kv-bench matrix
and session, capacity probes, CPU accounting, the Apache-generated client, and the demo."""

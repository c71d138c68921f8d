"""Running things on this machine: a managed ZooKeeper, node processes, local clusters."""

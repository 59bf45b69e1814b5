"""Ray actors around memflow: generator replicas, the memory bank service, storage."""

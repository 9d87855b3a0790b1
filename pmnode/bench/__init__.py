"""`pmnode bench`: codec, convergence, swarm throughput and time-to-loss measurements."""

"""A discrete-event simulator of the swarm, and its calibration on real local swarms."""

"""A swarm node and its roles, built on pmnode.core (compute) and pmnode.net (messages)."""

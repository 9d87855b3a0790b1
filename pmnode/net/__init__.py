"""Between processes: the wire format, data and control RPCs over hivemind P2P, DHT records,
membership and admission, payload checks, link shaping, the coordinator's status RPC."""

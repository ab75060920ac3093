"""The data plane between the BS and the agents: :mod:`.backend` (expert calls over ZeroMQ, the
status feed), :mod:`.profiling` (measured exchanges) and :mod:`.energy_attr` (energy per call)."""

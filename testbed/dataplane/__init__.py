"""The data plane between the BS and the agents: :mod:`.backend` (``RemoteExpertBackend``: the
connections, control requests and ``run_layer``), :mod:`.call` (one layer's calls as a
``LayerCall``, each call's ``CallRecord``), :mod:`.inflight` (requests while they are out:
waiting, deadlines, re-sending), :mod:`.wire` (the bytes of a request and a reply),
:mod:`.connection` (one agent's connection), :mod:`.status_feed` (the agents' status feed),
:mod:`.profiling` (measured exchanges) and :mod:`.energy_attr` (energy per call)."""

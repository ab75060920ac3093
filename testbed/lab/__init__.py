"""The lab: its hosts and how they are reached and prepared.

:mod:`.runner` (commands on the BS or a device: locally, over SSH), :mod:`.inventory` (the lab's
hosts), :mod:`.keys` (CURVE keys), :mod:`.jetson` (Jetson power facts), :mod:`.modelstore` (the
split models provisioning pushes), :mod:`.agents` (agent processes on this host), :mod:`.local`
(the namespace testbed) and :mod:`.provision` (agents and experts onto the devices over SSH).
"""

"""Running a recipe.

:mod:`.recipe` (the recipe as typed data); :mod:`.session` (:class:`~.session.Session`: the
set-up stages and their teardown, :func:`~.session.run_recipe`), :mod:`.trial` (one trial repeat),
:mod:`.recorder` (the manifest and the CSV tables) and :mod:`.resume`; what a trial uses:
:mod:`.workload`, :mod:`.decisions` (checks, placement, the selection hook), :mod:`.cluster` (the
only writer of the policies' ``ClusterState``), :mod:`.loading` (experts onto the agents),
:mod:`.device_profile`, :mod:`.prediction`, :mod:`.telemetry`, :mod:`.provenance`; what changes
during a trial: :mod:`.epochs` (link epochs), :mod:`.faults` with :mod:`.fault_effects`,
:mod:`.updates` (migrations); and the analytic twin: :mod:`.twin`, :mod:`.twin_clock`,
:mod:`.calibration`.
"""

"""Running a recipe: :mod:`.recipe` (the recipe as typed data), :mod:`.session` (a run: trials,
requests, recording), :mod:`.epochs` (link epochs), :mod:`.faults`, :mod:`.updates` (migrations)
and :mod:`.twin` (the analytic twin)."""

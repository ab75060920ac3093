"""What a run writes and how it is read back: :mod:`.schema` (file names, columns, CSV tables),
:mod:`.rows` (the rows a request leaves in the tables), :mod:`.report` (runs, groups, the
table), :mod:`.summary` (``summary_row`` and its number helpers), :mod:`.plots` (the PNGs),
:mod:`.comparison`, :mod:`.deployment` and :mod:`.fault_report` (report sections)."""

"""What a run writes and how it is read back: :mod:`.schema` (file names, columns, CSV tables),
:mod:`.report` (summaries, tables, plots), :mod:`.comparison`, :mod:`.deployment` and
:mod:`.fault_report` (report sections)."""

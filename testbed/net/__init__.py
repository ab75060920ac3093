"""The links: :mod:`.tc` (pure tc command builders and parsers), :mod:`.shaper` (``TcShaper``: the
BS's shaping, applied through a runner; it reads with :mod:`.tcread`, handles offloads with
:mod:`.offloads` and sends an epoch's rates with :mod:`.rates`), :mod:`.netlink` (tc over
netlink), :mod:`.verify` with :mod:`.netprobe` (measuring what a link delivers on the receiving
side) and :mod:`.channel` (the wireless channel model that sets the rates)."""

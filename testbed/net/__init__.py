"""The links: :mod:`.links` (tc builders, parsers and the shaper), :mod:`.netlink` (tc over
netlink), :mod:`.verify` with :mod:`.netprobe` (measuring what a link delivers on the receiving
side) and :mod:`.channel` (the wireless channel model that sets the rates)."""

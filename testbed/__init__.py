"""testbed package: the controller of moe-edge-testbed (see the README's "Layout")."""

from pathlib import Path

#: the folder holding the ``testbed``, ``models``, ``device_agent`` and ``recipes`` packages (the
#: checkout, or site-packages when installed)
ROOT = Path(__file__).resolve().parent.parent

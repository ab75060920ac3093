"""Provisioning over SSH: check each device, install the agent, push expert shards, start it.

``provision(inv, model_dir)`` works on every device of an inventory at once (a thread pool,
one SSH runner per device) and returns one :class:`DeviceReport` per device; a device that
fails (unreachable, wrong Python, full disk, ...) is reported and never stops the others.
Per device, pyinfra-style: read the state (one remote Python snippet, :data:`FACTS_PY`, from
:mod:`.facts_probe`), compare it with what is wanted, change only what differs. A second run
changes nothing: no file is rewritten and the agent keeps its PID. The check also reads the
Jetson power state (``nvpmodel -q``/``-p --verbose``, ``jetson_clocks --show``;
:mod:`testbed.lab.jetson`) into :attr:`DeviceReport.power`, tools a device lacks recorded as
not available.

What lives in the device's ``workdir``::

    venv/                 the agent's virtual environment (python -m venv --without-pip)
    wheels/               the wheelhouse pushed by the controller (+ .sha256.json cache)
    installed.json        what is installed: key = hash(project sources, wheels, reuse, python),
                          and the preflight run in the venv after the install
    nv_tegra_release      (tests only) read by the preflight before /etc/nv_tegra_release
    experts/              expert shards (+ .sha256.json: name -> size, mtime, sha256)
    models/<id>/          whole-model folders (MoE²), pushed by agents_push_models (+ .sha256.json)
    agent.pid agent.log   the detached agent (``setsid``), its output
    agent.ready.json      written by the agent once bound: endpoint, pub_endpoint, pid
    agent.json            how the running agent was started (argv, install key)

Wheels. The controller builds the project's own wheel (``pip wheel --no-deps`` on a copy of
the sources, cached under ``<cache>/wheels/project/<hash of the sources>/``, so it is built
again only when a source file changed) and obtains the wheels of the agent's dependencies
(:data:`AGENT_PACKAGES`) for the device's platform and Python with ``pip download
--only-binary=:all: --platform ... --python-version ...`` (cached under
``<cache>/wheels/deps-<platform>-<hash>/``), or takes them from ``--wheelhouse DIR`` (offline;
every ``*.whl`` there is pushed and pip resolves among them on the device). pip itself is not
needed on the device: the venv is created ``--without-pip`` and pip runs from its own wheel
(``python pip-X.whl/pip install ...``), taken from the wheelhouse, the cache or the
controller's ``ensurepip`` bundle. Everything is installed with ``--no-index``: the device
needs no internet.

Reused packages. A device's ``reuse_packages`` (JetPack's torch on a Jetson) are not installed;
the device's ``python`` is asked where it imports each from (``importlib.util.find_spec``), and
those directories are listed in ``venv/.../site-packages/moe_testbed_reuse.pth``. Chosen over
``--system-site-packages`` because it works whether the device's python is a system python, a
user install (``~/.local``) or itself a virtual environment (the local testbed's devices use the
controller's venv interpreter), and names exactly which directories are added. The added
directories come *after* the venv's own site-packages, so the installed project wins over any
other copy there; ``.pth`` files inside them are not processed.

Preflight. After each install the venv's python runs :mod:`device_agent.preflight` in the
workdir (as the agent runs): the L4T release and JetPack version where the device is a
Jetson, python, torch (version, CUDA build, CUDA available, device name), numpy and a
``torch.from_numpy`` round trip; recorded in ``installed.json`` and in each
:class:`DeviceReport` (``preflight``; a run copies it into its manifest), shown by ``testbed
agents status``. A Jetson whose torch has no CUDA is refused in one line naming the fix
(``reuse_packages = ["torch", "numpy"]`` with JetPack's torch) unless ``allow_cpu``
(``--allow-cpu``); torch and numpy that cannot exchange arrays (a torch built against NumPy 1
next to NumPy 2) are refused always. A recorded preflight that refuses is run again on the next
provision (a driver or package fixed since); one that passes serves until the next install.

Agents are started detached (``runner.spawn``: ``setsid``, log and pid file) with the venv's
python and the workdir as current directory, bind the device's address (``agent_port``, 0 = any
port) and are waited for until they answer a ZeroMQ ping. They are only ever stopped by PID,
after ``/proc/PID/cmdline`` shows that the PID is our agent (its ready-file path is in argv).

The modules, in the order one device is provisioned: :mod:`.facts` (the device check and its
checks), :mod:`.wheels` (the controller's wheels), :mod:`.files` (files pushed where they
differ, expert shards; :mod:`.placement` says which shards), :mod:`.agents` (starting, finding,
stopping the agent), :mod:`.device` (one device's steps, and :func:`provision`);
:mod:`.layout` (paths in the workdir) and :mod:`.fleet` (every device at once) serve them all.
:mod:`.facts_probe` and :mod:`.hash_probe` run on the device (``python -c``) and are never
imported.
"""

from .agents import (
    HELLO_DELTA,
    HELLO_KEEPALIVE_S,
    STATUS_PERIOD_S,
    agent_argv,
    agent_endpoints,
    agent_is_ours,
    agent_running,
    agent_view,
    agents_logs,
    agents_push_models,
    agents_status,
    agents_stop,
    bind_address,
    connect_endpoint,
    start_agent,
    stop_pid,
)
from .device import HEADROOM_BYTES, REUSE_PTH, allowing_cpu, provision, provision_device
from .facts import (
    ARCHITECTURES,
    CUDA_FIX,
    FACTS_PY,
    IMPORT_NAMES,
    INTEROP_FIX,
    JETPACK_OF_L4T,
    MIN_PYTHON,
    DeviceFacts,
    check_facts,
    import_name,
    jetpack_version,
    parse_facts,
    parse_nv_tegra_release,
    preflight_argv,
    preflight_refusal,
    preflight_summary,
    read_facts,
    read_preflight,
)
from .files import (
    HASH_CACHE,
    HASH_PY,
    push_files,
    remote_hashes,
    remote_workdir,
    sync_models,
    sync_shards,
)
from .fleet import DeviceReport
from .layout import Layout
from .placement import place_experts, shards_per_device
from .wheels import (
    AGENT_PACKAGES,
    AGENT_SOURCES,
    PROJECT_DIST,
    PROJECT_PACKAGES,
    agent_source_key,
    install_key,
    pip_download_argv,
    pip_platforms,
    project_wheel,
    source_files,
)

__all__ = [
    "AGENT_PACKAGES",
    "AGENT_SOURCES",
    "ARCHITECTURES",
    "CUDA_FIX",
    "FACTS_PY",
    "HASH_CACHE",
    "HASH_PY",
    "HEADROOM_BYTES",
    "HELLO_DELTA",
    "HELLO_KEEPALIVE_S",
    "IMPORT_NAMES",
    "INTEROP_FIX",
    "JETPACK_OF_L4T",
    "MIN_PYTHON",
    "PROJECT_DIST",
    "PROJECT_PACKAGES",
    "REUSE_PTH",
    "STATUS_PERIOD_S",
    "DeviceFacts",
    "DeviceReport",
    "Layout",
    "agent_argv",
    "agent_endpoints",
    "agent_is_ours",
    "agent_running",
    "agent_source_key",
    "agent_view",
    "agents_logs",
    "agents_push_models",
    "agents_status",
    "agents_stop",
    "allowing_cpu",
    "bind_address",
    "check_facts",
    "connect_endpoint",
    "import_name",
    "install_key",
    "jetpack_version",
    "parse_facts",
    "parse_nv_tegra_release",
    "pip_download_argv",
    "pip_platforms",
    "place_experts",
    "preflight_argv",
    "preflight_refusal",
    "preflight_summary",
    "project_wheel",
    "provision",
    "provision_device",
    "push_files",
    "read_facts",
    "read_preflight",
    "remote_hashes",
    "remote_workdir",
    "shards_per_device",
    "source_files",
    "start_agent",
    "stop_pid",
    "sync_models",
    "sync_shards",
]

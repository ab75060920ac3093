"""Jetson power modes: read ``nvpmodel`` and ``jetson_clocks`` over a runner, set a mode.

Pure parsers (tested on fixture text written from the documented formats):

* :func:`parse_nvpmodel_query` — ``nvpmodel -q`` prints ``NV Power Mode: MAXN`` and the mode id
  on the next line (``--verbose`` adds ``NVPM VERB:`` lines before them, some releases
  ``NVPM WARN:`` ones).
* :func:`parse_nvpmodel_modes` — ``nvpmodel -p --verbose`` lists the modes of the module's
  ``/etc/nvpmodel.conf`` as ``NVPM VERB: POWER_MODEL: ID=0 NAME=MAXN`` lines (then their
  ``PARAM`` lines), and the current one as ``NVPM VERB: Current mode: NV Power Mode: MAXN``
  followed by its id. Mode ids differ from module to module (AGX Orin: 0 = MAXN, 3 = 50W;
  Orin Nano: 0 = 15W, 1 = 7W), which is why a recipe names a mode and each device maps the
  name to its own id.
* :func:`parse_jetson_clocks_show` — ``jetson_clocks --show``: per CPU ``MinFreq``/``MaxFreq``/
  ``CurrentFreq``, the ``GPU`` and ``EMC`` lines; clocks are *pinned* (jetson_clocks applied)
  when every CPU and the GPU line has ``MinFreq == MaxFreq`` and the EMC is at its maximum
  (``FreqOverride=1``, or ``MinFreq == MaxFreq``).

:data:`POWER_QUERY_SH` runs all three in one remote shell (tools that are absent are reported
as not available, never an error), :func:`query_power` parses its output.
:func:`resolve_power_mode` maps what a recipe asks for to a device's mode id;
:func:`set_power_mode` runs ``sudo -n nvpmodel -m ID``.

Root runs only the tools themselves (``sudo -n nvpmodel -q``, ``-p --verbose``, ``-m ID``,
``sudo -n jetson_clocks --show``; the shell around them runs as the SSH user), which is what the
device sudoers line of ``testbed init`` allows (:data:`testbed.lab.init.DEVICE_COMMANDS`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .runner import Runner

_QUERY = re.compile(r"NV Power Mode:\s*(\S.*?)\s*$")
_MODEL = re.compile(r"POWER_MODEL:\s*ID\s*=\s*(\d+)\s+NAME\s*=\s*(\S+)")
_FREQS = re.compile(r"MinFreq=(\d+)\s+MaxFreq=(\d+)\s+CurrentFreq=(\d+)")


@dataclass(frozen=True)
class PowerMode:
    """One nvpmodel mode of a module."""

    id: int
    name: str


def _strip_prefix(line: str) -> str:
    """A line without nvpmodel's ``NVPM VERB:``/``NVPM WARN:``/``NVPM ERROR:`` prefix."""
    return re.sub(r"^\s*NVPM\s+[A-Z]+\s*:\s*", "", line).strip()


def parse_nvpmodel_query(text: str) -> PowerMode | None:
    """The current mode from ``nvpmodel -q`` (or the ``Current mode:`` part of ``-p
    --verbose``): the last ``NV Power Mode: NAME`` line and the integer on the next non-empty
    line. ``None`` when there is none."""
    lines = [ln.strip() for ln in text.splitlines()]
    found: PowerMode | None = None
    for i, ln in enumerate(lines):
        m = _QUERY.search(ln)
        if not m:
            continue
        name = m.group(1)
        for nxt in lines[i + 1 :]:
            if not nxt:
                continue
            rest = _strip_prefix(nxt)
            if rest.isdigit():
                found = PowerMode(int(rest), name)
            break
    return found


def parse_nvpmodel_modes(text: str) -> list[PowerMode]:
    """Every ``POWER_MODEL: ID=N NAME=X`` of ``nvpmodel -p --verbose``, in file order.

    Raises
    ------
    ValueError
        When two modes share an id or a name (a garbled listing).
    """
    modes: list[PowerMode] = []
    for ln in text.splitlines():
        m = _MODEL.search(ln)
        if m:
            modes.append(PowerMode(int(m.group(1)), m.group(2)))
    ids = [m.id for m in modes]
    names = [m.name for m in modes]
    if len(set(ids)) != len(ids) or len(set(names)) != len(names):
        raise ValueError(f"nvpmodel lists a mode id or name twice: {modes}")
    return modes


def parse_jetson_clocks_show(text: str) -> dict[str, Any]:
    """``jetson_clocks --show`` as ``{"pinned", "cpus", "cpus_pinned", "gpu", "emc",
    "power_mode"}``.

    ``gpu``/``emc`` are ``{min_hz, max_hz, cur_hz}`` (``None`` when the line is absent);
    ``pinned`` is true when every CPU line and the GPU line have ``MinFreq == MaxFreq`` and the
    EMC line (if any) has ``FreqOverride=1`` or ``MinFreq == MaxFreq`` (what jetson_clocks
    sets), ``None`` when no such line was found; ``power_mode`` is the ``NV Power Mode:`` name.
    """
    cpus = pinned_cpus = 0
    out: dict[str, Any] = {"gpu": None, "emc": None}
    all_pinned = True
    seen = False
    for ln in text.splitlines():
        s = ln.strip()
        m = _FREQS.search(s)
        if not m:
            continue
        lo, hi, cur = (int(g) for g in m.groups())
        seen = True
        if re.match(r"cpu\d+:", s):
            cpus += 1
            pinned_cpus += lo == hi
            all_pinned &= lo == hi
        elif s.startswith("GPU"):
            out["gpu"] = {"min_hz": lo, "max_hz": hi, "cur_hz": cur}
            all_pinned &= lo == hi
        elif s.startswith("EMC"):
            out["emc"] = {"min_hz": lo, "max_hz": hi, "cur_hz": cur}
            all_pinned &= lo == hi or "FreqOverride=1" in s
    names = [m.group(1) for m in map(_QUERY.search, text.splitlines()) if m]
    out.update(
        pinned=all_pinned if seen else None,
        cpus=cpus,
        cpus_pinned=pinned_cpus,
        power_mode=names[-1] if names else None,
    )
    return out


_MARK = "@@moe-testbed"

#: One remote shell that reports nvpmodel's current mode and mode list and jetson_clocks'
#: state, each between markers with its exit status; an absent tool prints ``missing``.
#: Tries without sudo first, then ``sudo -n`` (jetson_clocks --show needs root).
POWER_QUERY_SH = f"""
PATH="$PATH:/usr/sbin:/sbin:/usr/bin"
run() {{ name=$1; shift; echo "{_MARK} begin $name"
  if ! command -v "$1" >/dev/null 2>&1; then echo "{_MARK} end $name missing"; return; fi
  out=$("$@" </dev/null 2>&1); rc=$?
  if [ $rc -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    out2=$(sudo -n "$@" </dev/null 2>&1); rc2=$?
    if [ $rc2 -eq 0 ]; then out=$out2; rc=0; fi
  fi
  printf '%s\\n' "$out"; echo "{_MARK} end $name $rc"; }}
run query nvpmodel -q
run modes nvpmodel -p --verbose
run clocks jetson_clocks --show
"""


def split_sections(text: str) -> dict[str, tuple[str, str]]:
    """``{name: (status, body)}`` from :data:`POWER_QUERY_SH`'s output; ``status`` is the exit
    code as text, or ``missing``."""
    out: dict[str, tuple[str, str]] = {}
    cur: str | None = None
    body: list[str] = []
    for ln in text.splitlines():
        if ln.startswith(f"{_MARK} begin "):
            cur, body = ln.split()[-1], []
        elif ln.startswith(f"{_MARK} end ") and cur is not None:
            parts = ln.split()
            out[cur] = (parts[-1], "\n".join(body))
            cur = None
        elif cur is not None:
            body.append(ln)
    return out


def power_info_from_output(text: str) -> dict[str, Any]:
    """What goes into the manifest: ``nvpmodel`` and ``jetson_clocks``, each with
    ``available`` and, when available, the parsed state (or ``error`` with the tool's last
    line). Pure."""
    sec = split_sections(text)
    info: dict[str, Any] = {}

    def failed(name: str) -> dict[str, Any] | None:
        st, body = sec.get(name, ("missing", ""))
        if st == "missing":
            return {"available": False, "reason": "not installed"}
        if st != "0":
            tail = (body.strip().splitlines() or [""])[-1][:200]
            return {"available": True, "error": f"exit {st}: {tail}"}
        return None

    nv = failed("query")
    if nv is None:
        mode = parse_nvpmodel_query(sec["query"][1])
        nv = {
            "available": True,
            "mode": mode.name if mode else None,
            "mode_id": mode.id if mode else None,
        }
        modes_err = failed("modes")
        if modes_err is None:
            try:
                nv["modes"] = {str(m.id): m.name for m in parse_nvpmodel_modes(sec["modes"][1])}
            except ValueError as e:
                nv["modes_error"] = str(e)
        else:
            nv["modes_error"] = modes_err.get("error") or modes_err.get("reason")
    info["nvpmodel"] = nv
    jc = failed("clocks")
    if jc is None:
        jc = {"available": True, **parse_jetson_clocks_show(sec["clocks"][1])}
    info["jetson_clocks"] = jc
    return info


def query_power(runner: Runner, timeout_s: float = 30.0) -> dict[str, Any]:
    """:func:`power_info_from_output` of :data:`POWER_QUERY_SH` run through ``runner``."""
    res = runner.run(["sh", "-c", POWER_QUERY_SH], timeout_s=timeout_s, check=False)
    return power_info_from_output(res.stdout)


def resolve_power_mode(info: Mapping[str, Any], want: str | int, device: str, where: str) -> int:
    """The mode id ``device`` uses for ``want`` (a mode name, case-insensitive, or an id).

    Raises
    ------
    ConfigError
        One line naming ``where`` (the recipe key) and the device: no nvpmodel there, its
        modes could not be listed, or no such mode (the device's modes are listed).
    """
    nv = info.get("nvpmodel") or {}
    if not nv.get("available"):
        raise ConfigError(
            f"{where}: {device}: has no nvpmodel ({nv.get('reason', 'not available')}); "
            f"cannot set power mode {want!r}"
        )
    modes = nv.get("modes")
    if not isinstance(modes, Mapping) or not modes:
        why = nv.get("modes_error") or nv.get("error") or "no modes listed"
        raise ConfigError(f"{where}: {device}: cannot list nvpmodel modes ({why})")
    pairs = [(int(i), str(n)) for i, n in modes.items()]
    if isinstance(want, int):
        if any(i == want for i, _ in pairs):
            return want
    else:
        for i, n in pairs:
            if n.lower() == want.lower():
                return i
    known = ", ".join(f"{i}={n}" for i, n in sorted(pairs))
    raise ConfigError(f"{where}: {device}: no nvpmodel mode {want!r} (has {known})")


def set_power_mode(runner: Runner, mode_id: int, timeout_s: float = 60.0) -> None:
    """``sudo -n nvpmodel -m ID`` (no prompt: a mode that needs a reboot fails here).

    Raises
    ------
    testbed.errors.CommandFailed
        When nvpmodel refuses (the error carries its output).
    """
    runner.run(
        [
            "sh",
            "-c",
            'PATH="$PATH:/usr/sbin:/sbin"; exec sudo -n nvpmodel -m "$1" </dev/null',
            "sh",
            str(int(mode_id)),
        ],
        timeout_s=timeout_s,
    )


class PowerModeControl:
    """A recipe's ``devices.power_mode`` over a run: checked on every device first, applied per
    trial, each device's own mode restored at the end.

    Use :meth:`open`; it returns ``None`` when no trial asks for a mode (then no SSH session is
    opened and nothing is touched).

    Parameters
    ----------
    runners
        device name -> its runner (closed by :meth:`restore`).
    infos
        device name -> :func:`query_power` of it.
    ids
        (wanted value, device) -> the device's mode id for it.
    """

    def __init__(
        self,
        runners: Mapping[str, Runner],
        infos: Mapping[str, Mapping[str, Any]],
        ids: Mapping[tuple[str | int, str], int],
    ) -> None:
        self.runners = dict(runners)
        self.infos = dict(infos)
        self.ids = dict(ids)
        self.original: dict[str, int] = {}
        for d, info in self.infos.items():
            mode_id = (info.get("nvpmodel") or {}).get("mode_id")
            if isinstance(mode_id, int):
                self.original[d] = mode_id
        self.current = dict(self.original)
        self.names = {
            d: {int(i): n for i, n in ((info.get("nvpmodel") or {}).get("modes") or {}).items()}
            for d, info in self.infos.items()
        }

    @classmethod
    def check(
        cls, infos: Mapping[str, Mapping[str, Any]], wanted: Sequence[str | int | None], where: str
    ) -> dict[tuple[str | int, str], int]:
        """(wanted value, device) -> mode id for every value asked and every device. Pure.

        Raises
        ------
        ConfigError
            One line naming ``where`` and each device that lacks nvpmodel or the mode, or
            whose current mode is unknown (it could not be restored).
        """
        problems: list[str] = []
        ids: dict[tuple[str | int, str], int] = {}
        for d in infos:
            for w in dict.fromkeys(v for v in wanted if v is not None):
                try:
                    ids[(w, d)] = resolve_power_mode(infos[d], w, d, where)
                except ConfigError as e:
                    problems.append(
                        str(e)[len(where) + 2 :] if str(e).startswith(where) else str(e)
                    )
                    break
            else:
                if not isinstance((infos[d].get("nvpmodel") or {}).get("mode_id"), int):
                    problems.append(f"{d}: current nvpmodel mode unknown (nothing to restore to)")
        if problems:
            raise ConfigError(f"{where}: " + "; ".join(problems))
        return ids

    @classmethod
    def open(
        cls, runners: Mapping[str, Runner], wanted: Sequence[str | int | None], where: str
    ) -> PowerModeControl | None:
        """Query every device (in parallel) and :meth:`check`; ``None`` when nothing is
        wanted. The runners are closed on a failed check."""
        if all(v is None for v in wanted):
            return None
        from concurrent.futures import ThreadPoolExecutor

        names = list(runners)
        try:
            with ThreadPoolExecutor(max_workers=min(16, max(1, len(names)))) as pool:
                infos = dict(zip(names, pool.map(lambda n: query_power(runners[n]), names)))
            ids = cls.check(infos, wanted, where)
        except BaseException:
            for r in runners.values():
                r.close()
            raise
        return cls(runners, infos, ids)

    def _set(self, device: str, mode_id: int) -> None:
        if self.current.get(device) != mode_id:
            set_power_mode(self.runners[device], mode_id)
            self.current[device] = mode_id

    def apply(self, want: str | int | None) -> dict[str, dict[str, Any]]:
        """Put every device in mode ``want`` (``None``: its own mode from before the run);
        returns device -> ``{"id", "name"}`` as set."""
        out = {}
        for d in self.runners:
            mode_id = self.original[d] if want is None else self.ids[(want, d)]
            self._set(d, mode_id)
            out[d] = {"id": mode_id, "name": self.names.get(d, {}).get(mode_id)}
        return out

    def restore(self) -> dict[str, Any]:
        """Every device back to its own mode (each tried, errors collected); closes the
        runners. Returns device -> the mode id restored, or the error."""
        done: dict[str, Any] = {}
        for d, r in self.runners.items():
            try:
                self._set(d, self.original[d])
                done[d] = self.original[d]
            except Exception as e:  # noqa: BLE001 - every device is tried; reported per device
                done[d] = f"not restored: {type(e).__name__}: {e}"
            finally:
                r.close()
        return done

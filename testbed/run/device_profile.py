"""Each trial's profiling of its devices through the BS's exchange, and the fits made from it:
each device's compute profile and the calibrated latency model's parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..dataplane.profiling import fit_profiles, profile_exchanges
from ..net.tc import LinkSpec

#: the links' rate, both ways, while a trial's devices are profiled: fast enough that the calls'
#: fixed costs are not small differences of long airtimes, and like the rates runs see, since
#: what calls running together cost each other grows with the CPU work their transfers need per
#: millisecond (at 300 Mbit/s two 1-token calls together took 1.6 ms more than alone, in the
#: demo's 20-100 MHz cells about 0.5)
PROFILE_KBIT = 50_000.0
#: repeats of each profiled exchange (its median per call shape is fitted)
PROFILE_REPEATS = 5


class DeviceProfiler:
    """Profiles a trial's devices (:meth:`profile`); keeps every device's latest compute profile
    (``profiles``: name -> (a_ms, b_ms)) over the run.

    Parameters
    ----------
    shaper:
        The BS's :class:`testbed.net.shaper.TcShaper`.
    all_devices:
        How many devices the inventory has (the tc tree is set up for all of them).
    backend:
        The expert backend the exchanges are run through.
    model:
        (the expert's hidden size, the rows' dtype on the wire, the recipe's seed).
    table, manifest, run_id:
        ``profile.csv``, the run's manifest (its ``compute_profile`` and ``latency_model``
        entries) and the run's id.
    """

    def __init__(
        self,
        shaper: Any,
        all_devices: int,
        backend: Any,
        model: tuple[int, Any, int],
        table: Any,
        manifest: dict[str, Any],
        run_id: str,
    ):
        self.shaper, self.all_devices, self.backend = shaper, all_devices, backend
        self.hidden_size, self.wire_dtype, self.seed = model
        self.table, self.manifest, self.run_id = table, manifest, run_id
        #: device -> (a_ms, b_ms), the latest fit
        self.profiles: dict[str, tuple[float, float]] = {}
        #: exchange ids used so far (each profiling continues after the last)
        self.exchanges = 0

    def _profile_rates(self, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Links of ``names`` at :data:`PROFILE_KBIT` both ways; (shaping info, device -> rates)."""
        sh = self.shaper
        if not sh.is_installed():
            n = self.all_devices
            sh.setup([LinkSpec(PROFILE_KBIT)] * n, [LinkSpec(PROFILE_KBIT)] * n)
        else:
            for d in names:
                for direction in ("down", "up"):
                    sh.change(d, LinkSpec(PROFILE_KBIT), direction)
        return sh.shaping_info(), {s.device: s for s in sh.show()}

    def _samples(
        self, trial: int, mine: Mapping[str, Sequence[str]], rates: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """Run the profiling exchanges of ``mine`` (device -> its experts); rows to profile.csv."""
        start = self.exchanges
        samples = profile_exchanges(
            self.backend,
            mine,
            self.hidden_size,
            self.wire_dtype,
            seed=self.seed,
            start_id=start,
            repeats=PROFILE_REPEATS,
        )
        self.exchanges = start + len({s["layer"] for s in samples}) + 1
        for s in samples:
            s["rate_down_kbit"] = rates[s["device"]].down_kbit
            s["rate_up_kbit"] = rates[s["device"]].up_kbit
        self.table.write_many(
            [
                {
                    "run_id": self.run_id,
                    "trial": trial,
                    **{k: v for k, v in s.items() if k != "layer"},
                    "exchange": s["layer"],
                }
                for s in samples
            ]
        )
        return samples

    def profile(
        self,
        trial: int,
        names: Sequence[str],
        placement: Mapping[str, Sequence[str]],
        bytes_per_token: int,
        progress: Any,
    ) -> tuple[Any, dict[str, Any]]:
        """Profile the trial's devices ``names`` through the BS's exchange, links at
        :data:`PROFILE_KBIT` both ways (:func:`testbed.dataplane.profiling.profile_exchanges`:
        calls of 1..32 tokens, of one and two of each device's experts, each device alone and
        all at once); the samples go to ``profile.csv``. Fits each device's compute profile (its
        alone, one-expert calls; the first trial's is the manifest's ``compute_profile``) and
        the calibrated latency model (:func:`testbed.policy.latency_model.fit_layer_costs`): returns
        its parameters and the fit that the trial's manifest entry records (with the
        residuals)."""
        info, rates = self._profile_rates(names)
        mine = {
            n: [u for u, ds in sorted(placement.items()) if ds and ds[0] == n][:2] for n in names
        }
        mine = {n: us for n, us in mine.items() if us}
        progress.message(f"profiling {', '.join(mine)}")
        samples = self._samples(trial, mine, rates)
        single = [s for s in samples if s["experts"] == 1 and s["devices"] == 1]
        trial_profile = {}
        for d, fit in fit_profiles(single).items():
            uid = mine[d][0]
            self.manifest["compute_profile"].setdefault(d, {"expert": uid, "trial": trial, **fit})
            self.profiles[d] = (fit["a_ms"], fit["b_ms"])
            trial_profile[d] = {"expert": uid, **fit}
        params, resid = fit_layer_model(samples, info, names, bytes_per_token)
        latency_fit = {
            "params": params.to_dict(),
            "residuals": resid,
            "profile_kbit": PROFILE_KBIT,
            "samples": len(samples),
            "compute_profile": trial_profile,
        }
        self.manifest["latency_model"] = params.to_dict()
        return params, latency_fit


def fit_layer_model(
    samples: Sequence[Mapping[str, Any]],
    info: Mapping[str, Any],
    names: Sequence[str],
    bytes_per_token: int,
) -> tuple[Any, Any]:
    """(parameters, residuals) of the calibrated latency model fitted to ``samples``, with the
    links' shaping ``info`` (mode, bucket) as tc reported it while they were taken."""
    from ..policy.latency_model import LayerCostParams, fit_layer_costs

    mode = info.get("mode") or "none"
    base = LayerCostParams(
        bytes_per_token=bytes_per_token,
        device_names=tuple(names),
        shaping=mode,
        bucket_bytes=float(info.get("bucket_bytes") or 0) if mode != "htb" else 0.0,
        bucket_slack_us=float(info.get("bucket_slack_us") or 0),
        mtu=int(info["bucket_bytes"]) - 14 if mode == "tbf" and info.get("bucket_bytes") else 1500,
    )
    return fit_layer_costs(samples, base)

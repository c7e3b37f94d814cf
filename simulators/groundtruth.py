"""Ground truth: the dose every metre of cable really received (pure, no clock).

The plant calls `step` once per integration step (1 ms or finer) with the charge the
beam delivered and the cable path that moved in that step. Each pass k deposits
`w_k * K * dQ / (60000 * W)` kGy*m spread evenly over the stretch of cable that crossed
it during the step (process.md); a metre's dose is what landed in [i, i+1) m divided by
1 m. This is independent of the controller's dose code on purpose: it is what the
controller is checked against.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from linectl.config import Geometry

BURN_SPEED_M_MIN = 0.1
"""Below this line speed a cable under the beam counts as standing still."""


@dataclass
class Burn:
    """An interval in which the cable stood (almost) still under the beam."""

    t_start_s: float
    t_end_s: float
    position_m: list[float]
    """Cable coordinate under each pass at the start."""
    charge_uc: float = 0.0
    deposit_kgy_m: float = 0.0
    """Dose * length deposited by all passes during the interval."""
    peak_metre_dose_kgy: float = 0.0
    """Largest dose any single metre collected during the interval."""
    _per_metre: dict[int, float] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        d = asdict(self)
        d.pop("_per_metre", None)
        d["duration_s"] = self.t_end_s - self.t_start_s
        return d


class DoseTruth:
    """Integrates the true dose per metre of cable over every pass."""

    def __init__(self, geometry: Geometry, k_dose: float = 1500.0) -> None:
        self.geometry = geometry
        self.k_dose = k_dose
        self.weights = geometry.weights
        self.offsets_m = [geometry.offset_m(k) for k in range(geometry.passes)]
        self.path_m = 0.0
        """True cable path moved since the truth started."""
        self.l0_m = 0.0
        """Path position of cable coordinate 0 (the reel start)."""
        self.t_s = 0.0
        self.charge_uc = 0.0
        self.bins: dict[int, float] = {}
        """Metre index -> kGy*m deposited in [i, i+1)."""
        self.burns: list[Burn] = []
        self._burn: Burn | None = None

    def start_reel(self, path_m: float | None = None) -> None:
        """Cable coordinate 0 is the cable at the counter now (or at true path `path_m`).

        A new reel starts a fresh record: cable with coordinate >= 0 has not reached
        pass 0 yet, so nothing of the new reel is lost by clearing.
        """
        self.l0_m = self.path_m if path_m is None else path_m
        self.bins = {}
        self.burns = []
        self._burn = None

    def coordinate_m(self, k: int = 0) -> float:
        """Cable coordinate under pass k now."""
        return self.path_m - self.l0_m - self.offsets_m[k]

    @property
    def complete_length_m(self) -> float:
        """Cable coordinate up to which every metre has left the last pass."""
        return self.path_m - self.l0_m - self.offsets_m[-1]

    def step(self, t_s: float, dq_uc: float, dx_m: float, scan_width_cm: float) -> None:
        """Account one integration step ending at t_s."""
        x0 = self.path_m - self.l0_m
        self.path_m += dx_m
        dt_s = t_s - self.t_s
        self.t_s = t_s
        self.charge_uc += dq_uc
        standing = dt_s > 0 and dx_m / dt_s * 60.0 < BURN_SPEED_M_MIN
        if dq_uc <= 0 or scan_width_cm <= 0:
            self._end_burn()
            return
        e = self.k_dose * dq_uc / (60000.0 * scan_width_cm)
        bins = self.bins
        burn = None
        if standing:
            burn = self._burn
            if burn is None:
                burn = Burn(t_s - dt_s, t_s, [x0 - o for o in self.offsets_m])
                self._burn = burn
                self.burns.append(burn)
            burn.t_end_s = t_s
            burn.charge_uc += dq_uc
        else:
            self._end_burn()
        for w, off in zip(self.weights, self.offsets_m, strict=True):
            ek = w * e
            a = x0 - off
            b = a + dx_m
            ia = math.floor(a)
            ib = math.floor(b) if b > a else ia
            if ia == ib:
                bins[ia] = bins.get(ia, 0.0) + ek
                if burn is not None:
                    burn._per_metre[ia] = burn._per_metre.get(ia, 0.0) + ek
                continue
            # the stretch spans metre boundaries: split in proportion to length
            per_m = ek / (b - a)
            bins[ia] = bins.get(ia, 0.0) + per_m * (ia + 1 - a)
            for i in range(ia + 1, ib):
                bins[i] = bins.get(i, 0.0) + per_m
            bins[ib] = bins.get(ib, 0.0) + per_m * (b - ib)
        if burn is not None:
            burn.deposit_kgy_m += e * sum(self.weights)
            burn.peak_metre_dose_kgy = max(burn._per_metre.values())

    def _end_burn(self) -> None:
        self._burn = None

    # ------------------------------------------------------------------ report

    def dose_kgy(self, metre: int) -> float:
        """Mean dose of metre [metre, metre+1), kGy."""
        return self.bins.get(metre, 0.0)

    def complete_metres(self) -> range:
        """Metre indices from 0 that have fully left the last pass."""
        # the epsilon keeps float summation noise from hiding the last whole metre
        return range(max(0, math.floor(self.complete_length_m + 1e-6)))

    def doses(self, complete_only: bool = True) -> dict[int, float]:
        """Metre index -> dose, kGy (from 0; also the leader if complete_only is False)."""
        if complete_only:
            return {i: self.bins.get(i, 0.0) for i in self.complete_metres()}
        return dict(sorted(self.bins.items()))

    def report(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return {
            "k_dose": self.k_dose,
            "passes": self.geometry.passes,
            "pass_offsets_m": self.offsets_m,
            "pass_weights": self.weights,
            "t_s": self.t_s,
            "charge_uc": self.charge_uc,
            "cable_m": self.path_m - self.l0_m,
            "complete_length_m": self.complete_length_m,
            "dose_kgy": [
                {"metre": i, "dose_kgy": d, "complete": i + 1 <= self.complete_length_m + 1e-6}
                for i, d in sorted(self.bins.items())
            ],
            "burns": [b.as_dict() for b in self.burns],
        }

    def write(self, path: Path | str) -> None:
        """JSON (default) or CSV when the name ends in .csv (burns as # comments)."""
        path = Path(path)
        rep = self.report()
        if path.suffix.lower() != ".csv":
            path.write_text(json.dumps(rep, indent=1) + "\n", encoding="utf-8")
            return
        with path.open("w", newline="", encoding="utf-8") as f:
            f.write(
                f"# k_dose={self.k_dose} complete_length_m={self.complete_length_m:.3f} "
                f"charge_uc={self.charge_uc:.1f}\n"
            )
            for b in rep["burns"]:
                f.write(
                    f"# burn t_start_s={b['t_start_s']:.3f} duration_s={b['duration_s']:.3f} "
                    f"position_m={b['position_m'][0]:.3f} deposit_kgy_m={b['deposit_kgy_m']:.3f} "
                    f"peak_metre_dose_kgy={b['peak_metre_dose_kgy']:.3f}\n"
                )
            w = csv.writer(f)
            w.writerow(["metre", "start_m", "end_m", "dose_kgy", "complete"])
            for row in rep["dose_kgy"]:
                i = row["metre"]
                w.writerow([i, i, i + 1, f"{row['dose_kgy']:.6f}", int(row["complete"])])

"""CI runs the soak for 3 iterations (scripts/soak, docs/testing.md): random
trees saved, restored, rsynced into staging and committed, with kill -9 at
stop points and storage faults, every snapshot verified. The first two
iterations of any run cover a kill and a fault in each phase."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .conftest import ROOT

SEED = "1"  # fixed, so CI reruns what failed; `scripts/soak N` alone draws one


def test_soak_three_iterations(tmp_path: Path) -> None:
    work = tmp_path / "soak"
    result = subprocess.run([str(ROOT / "scripts" / "soak"), "3", "--seed", SEED, "--max-mib", "16",
                             "--work", str(work), "--keep"], capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "differences: 0" in result.stdout
    report = json.loads((work / "report.json").read_text())
    assert report["iterations"] == 3 and report["differences"] == []
    outcomes = [(event["kind"], event["outcome"]) for event in report["events"]]
    landed = [o for kind, o in outcomes if kind == "kill" and o.startswith("landed")]
    injected = [o for kind, o in outcomes if kind != "kill" and not o.startswith(("missed", "could not"))]
    assert landed and injected, f"nothing was killed or broken: {outcomes}"
    assert report["verified"] >= 6  # each iteration's save and commit, at least

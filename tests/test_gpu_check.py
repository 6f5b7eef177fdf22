"""The GPU check (tests/gpu/) stays runnable on the days no GPU is lent: its dry run goes through
every item on the CPU, and what it would carry to the GPU machine covers what tuner imports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))

import check  # noqa: E402
import wheels  # noqa: E402


@pytest.mark.slow
def test_the_dry_run_goes_through_every_item_and_reports_each_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "tests/gpu/check.py", "--dry-run", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    not_ok = [i for i in summary["items"] if i["status"] != "ok"]
    assert done.returncode == 0 and not not_ok, (not_ok, (out / "check.log").read_text()[-3000:])
    assert [i["item"] for i in summary["items"]] == [
        *(i for i, _, _ in check.ITEMS if i not in check.ALONE),
        *(i for i, _, _ in check.ITEMS if i in check.ALONE),
    ]
    assert all(i["status"] == "ok" for i in summary["items"])
    figures = {f["figure"]: f for f in summary["figures"]}
    # Every figure of the GPU run is there, measured (Liger and vLLM are not installed here).
    for run in ("hf_peft", "tuner", "tuner_packed", "zero2", "zero3", "qlora"):
        assert figures[run]["ran"] and figures[run]["value"] > 0, figures[run]
    assert figures["tuner_packed_liger"]["ran"] is False
    assert figures["imports_without_ray"]["value"] is True
    sweep = figures["sweep_trials"]
    assert sweep["value"] == 4 and sweep["failed"] == 0 and sweep["pruned"] >= 1
    assert 0 < figures["sweep_overhead_share"]["value"] < 1
    assert figures["warm_start_share"]["cold_s"] > figures["warm_start_share"]["warm_s"] > 0
    assert figures["generation"]["new_tokens"] > 0
    assert set(summary["goals"]) >= {"trial_vs_hf_peft", "warm_start_share"}
    # One JSON line per figure on stdout, as the lease's output tail shows them.
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {f["figure"] for f in lines if "figure" in f} == set(figures)
    print(f"dry run: {summary['wall_s']:.0f} s")


def test_what_travels_covers_every_core_requirement_the_gpu_machine_lacks() -> None:
    """A core requirement neither carried nor on the GPU image would be an ImportError there,
    found only inside the 15 minutes of a lease."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {
        wheels._norm(re.split(r"[<>=!~\[;\s]", spec, maxsplit=1)[0])
        for spec in project["dependencies"]
    }
    missing = needed - set(map(wheels._norm, [*wheels.CARRY, *wheels.LEFT_BEHIND]))
    missing -= wheels.ON_THE_MACHINE
    assert not missing, f"add to tests/gpu/wheels.py CARRY: {sorted(missing)}"
    carried = set(map(wheels._norm, [*wheels.CARRY, *wheels.BUILT, *wheels.OPTIONAL]))
    assert "ray" not in carried and "torch" not in carried
    pins = wheels.constraints()
    assert "deepspeed" in pins and "optuna" in pins

"""The suite's own machinery: `make test` runs side by side (pytest-xdist, `--dist loadgroup`),
and the tests that share a costly cluster or server are kept in one process by their group."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


@pytest.mark.slow
def test_a_group_runs_whole_in_one_process(tmp_path: Path) -> None:
    """pytest 9.2 with pytest-xdist 3.8: the group never reached the test's id, and a Ray
    module's tests ran in three processes at once, each starting the module's cluster."""
    (tmp_path / "test_probe.py").write_text(
        textwrap.dedent(
            """
            import os
            import pytest

            @pytest.mark.xdist_group("shared")
            @pytest.mark.parametrize("i", range(8))
            def test_in_the_group(i):
                with open("ran.txt", "a") as ran:
                    ran.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

            @pytest.mark.parametrize("i", range(8))
            def test_alone(i):
                pass
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "3"]
        + ["--dist", "loadgroup", "-c", "/dev/null", "--rootdir", str(tmp_path), "test_probe.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    workers = (tmp_path / "ran.txt").read_text().split()
    assert len(workers) == 8 and len(set(workers)) == 1, workers

"""Quiet by default: what a user reads is tuner's own lines and its progress bar, not the training
stack's warnings and bars (trials/quiet.py); `TUNER_VERBOSITY` >= 1 (`tuner -v`) lets them through,
and errors always come through."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART_ENV, Quickstart, run_cli

# A log line of tuner's own (`LEVEL name: message`, with the date and time the CLI adds; a worker
# names its process too) and the lines the CLI itself writes; anything else is a library's.
TUNERS = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+ )?"
    r"(tuner|trials)(\.\w+)*: "
)
CLI_LINES = {
    "demo": re.compile(r"demo (model|data): "),
    "create": re.compile(r"quickstart$"),
    "run": re.compile(
        r"\d+ trials? finished: |best |(details|watch|export): |"
        r"trial \d+ (complete|pruned|failed)\b|.*\d+ \[[^\]]*(trial/s|s/trial)"  # the bar
    ),
    "export": re.compile(r"exported trial \d+ "),
}


def _not_tuners(output: str, command: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if line.strip() and not (TUNERS.match(line) or CLI_LINES[command].match(line))
    ]


@pytest.mark.slow
def test_a_quickstart_run_and_its_export_print_only_tuners_lines(
    quickstart: Quickstart, tmp_path: Path
) -> None:
    """`tuner demo prepare`, `study create`, two trials at once (tests/conftest.py
    `QUICKSTART`, at the default verbosity) and an export, as a user runs them."""
    printed = {
        command: done["stdout"] + done["stderr"] for command, done in quickstart.printed.items()
    }
    store = f"sqlite:///{quickstart.folder / 'tuner.db'}"
    export = ["study", "export", "quickstart", "--out", "best", "--storage", store]
    result = run_cli(*export, cwd=tmp_path, env=QUICKSTART_ENV)
    assert result.returncode == 0, result.stderr
    printed["export"] = result.stdout + result.stderr
    for command, output in printed.items():
        assert _not_tuners(output, command) == [], f"`tuner {command}` printed:\n{output}"
    assert "trial 1 complete" in printed["run"] and "exported trial" in printed["export"]


QUIETED = """
import logging, warnings
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from trials.quiet import quiet_libraries
quiet_libraries()
quiet_libraries()  # a second call adds nothing
from transformers.utils import logging as hf_logging
print("bars", hf_logging.is_progress_bar_enabled(), flush=True)
hub = logging.getLogger("huggingface_hub.utils._http")
hub.warning("Retrying in 1s [Retry 1/5].")
hub.error("hub error")
warnings.warn_explicit(
    "`is_gradient_checkpointing` is deprecated", FutureWarning, "m.py", 1,
    module="transformers.modeling_utils",
)
warnings.warn_explicit("deprecated in user code", FutureWarning, "m.py", 2, module="recipe")
logging.getLogger("tuner.core.study").info("tuner's own line")
"""


def _quieted(verbosity: str) -> str:
    env = {**os.environ, "TUNER_VERBOSITY": verbosity}
    done = subprocess.run(
        [sys.executable, "-c", QUIETED], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_by_default_library_warnings_go_and_errors_and_tuners_lines_stay() -> None:
    lines = _quieted("0").splitlines()
    assert "bars False" in lines
    assert not [line for line in lines if "Retrying" in line or "is_gradient_check" in line]
    assert sum("hub error" in line for line in lines) == 1  # shown, and once
    assert any("deprecated in user code" in line for line in lines)  # not the libraries' own
    assert "INFO tuner.core.study: tuner's own line" in lines


def test_verbose_lets_the_libraries_speak_once_each() -> None:
    lines = _quieted("1").splitlines()
    assert "bars True" in lines
    assert sum("Retrying in 1s" in line for line in lines) == 1  # not also through logging
    assert any("is_gradient_checkpointing" in line for line in lines)


# --- issue 22: i22-input ---

DEEPSPEED = """
import logging
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from trials.quiet import quiet_libraries
quiet_libraries()
import deepspeed  # no GPU here: "Setting accelerator to CPU" as it is imported
from deepspeed.utils import logger
logger.error("an error of DeepSpeed's")
"""


@pytest.mark.parametrize("verbosity", ["0", "1"])
@pytest.mark.slow
def test_deepspeeds_lines_go_to_the_log_never_to_stdout(verbosity: str) -> None:
    """DeepSpeed's logger has a handler of its own on stdout, which `--json` keeps for its one
    object; its lines go to the log (stderr) instead: errors always, warnings from -v on."""
    env = {**os.environ, "TUNER_VERBOSITY": verbosity, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("DS_ACCELERATOR", None)
    done = subprocess.run(
        [sys.executable, "-c", DEEPSPEED], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ""
    assert "ERROR DeepSpeed: an error of DeepSpeed's" in done.stderr.splitlines()
    warned = "WARNING DeepSpeed: Setting accelerator to CPU" in done.stderr
    assert warned == (verbosity == "1"), done.stderr[-2000:]

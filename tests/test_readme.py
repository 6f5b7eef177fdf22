"""The README's commands after `make demo` work as written, on a fresh copy of the repository.

Every shell block after the quickstart's `make demo` carries a marker saying what the test does
with it: `<!-- readme-test: run -->` runs it as one bash script, `<!-- readme-test: serves URL
-->` starts it, waits for URL to answer and stops it, `<!-- readme-test: skip (why) -->` leaves
it out; only blocks that need GPUs or a cluster may be skipped, and the marker says which.
The study they look at is the quickstart's, made small: the demo files, `study create` and
`study run --n-trials 3` (tests/conftest.py `QUICKSTART`, not the whole 16-trial demo).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Quickstart

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<mark>.*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S
)


@dataclass
class Block:
    mark: str  # run | serves URL | skip (why) | "" when unmarked
    code: str
    line: int


def shell_blocks_after_make_demo(text: str) -> list[Block]:
    """The bash blocks that follow the one running `make demo`."""
    blocks, seen_demo = [], False
    for m in _BLOCK.finditer(text):
        if m["lang"] != "bash":
            continue
        if seen_demo:
            line = text.count("\n", 0, m.start("code"))
            blocks.append(Block(mark=(m["mark"] or "").strip(), code=m["code"], line=line))
        seen_demo = seen_demo or re.search(r"^make demo\b", m["code"], re.M) is not None
    return blocks


def test_every_block_after_the_quickstart_says_how_it_is_tested():
    blocks = shell_blocks_after_make_demo(README.read_text())
    assert any(b.mark == "run" for b in blocks), "the quickstart's follow-up block is not run"
    for b in blocks:
        assert re.fullmatch(r"run|serves https?://\S+|skip \(.*(GPU|cluster).*\)", b.mark), (
            f"README.md line {b.line}: a shell block needs `<!-- readme-test: run -->`, "
            f"`serves URL` or `skip (needs GPUs ... / a cluster)` (got {b.mark!r})"
        )
    first = next(b for b in blocks if b.mark == "run")
    assert first.code.lstrip().startswith("source .venv/bin/activate"), (
        "the first command after `make demo` puts tuner on the PATH"
    )


@pytest.fixture
def fresh_clone(tmp_path: Path, quickstart: Quickstart) -> Path:
    """The repository's files (as git would clone them, with this change's new files), the venv
    that runs the tests where `make setup` puts it, and the quickstart's study (its store and
    demo files; tests/conftest.py `QUICKSTART`: 3 trials, not `make demo`'s 16)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    repo = tmp_path / "tuner"
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    (repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    # What `make demo` leaves beside the README. The study's stored paths (base model, data,
    # adapters) stay the shared folder's, which the README's commands only read.
    shutil.copytree(quickstart.folder / "demo", repo / "demo")
    with (
        contextlib.closing(sqlite3.connect(quickstart.folder / "tuner.db")) as source,
        contextlib.closing(sqlite3.connect(repo / "tuner.db")) as copy,
    ):
        source.backup(copy)  # whole, whatever other tests read from it meanwhile
    return repo


def _env(repo: Path) -> dict[str, str]:
    """A user's shell: no store or artifact location set, no network for the hub; the copy's
    code first on the path (the venv's editable install points at the working tree)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TUNER_") or k == "TUNER_TORCH_THREADS"  # the test machine's policy
    }
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    env["PYTHONPATH"] = str(repo)
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.slow  # the quickstart's training, an export and the dashboard
def test_readme_commands_run_as_written(fresh_clone: Path):
    # Not a command before the README activates the venv: the first-hour failure it fixes.
    assert shutil.which("tuner", path=_env(fresh_clone)["PATH"]) is None
    failures, shell = [], ""
    for block in shell_blocks_after_make_demo(README.read_text()):
        if block.mark == "run":
            failures += _run(block, fresh_clone, shell)
        elif block.mark.startswith("serves"):
            failures += _serve(block, fresh_clone, block.mark.split()[1], shell)
        if ACTIVATE in block.code:
            shell = ACTIVATE + "\n"  # the reader's terminal stays activated for what follows
    assert not failures, "README commands that failed:\n" + "\n".join(failures)


ACTIVATE = "source .venv/bin/activate"


def _run(block: Block, repo: Path, shell: str) -> list[str]:
    # One script, as a user pastes it: the trap names every command that fails, and goes on.
    script = (
        "set -o errtrace\n"
        "trap 'echo \"README.md line $((LINENO + OFFSET)): exit $?: $BASH_COMMAND\" >&2' ERR\n"
        + shell
        + block.code
    )
    env = {**_env(repo), "OFFSET": str(block.line - 2 - shell.count("\n"))}
    done = subprocess.run(
        ["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    failed = [line for line in done.stderr.splitlines() if line.startswith("README.md line")]
    if failed:
        failed.append("its stderr ends:\n" + done.stderr[-2000:])
    return failed


def _serve(block: Block, repo: Path, url: str, shell: str) -> list[str]:
    server = subprocess.Popen(
        ["bash", "-c", shell + block.code],
        cwd=repo,
        env=_env(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so the test stops it and its children
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return []
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        return [f"README.md line {block.line + 1}: {block.code.strip()} did not serve {url}"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        output = server.stdout.read() if server.stdout else ""
        if output.strip():
            print(f"{block.code.strip()} printed:\n{output[-2000:]}")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize(
    "page", ["README.md", "CHANGELOG.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))]
)
def test_links_between_the_pages_lead_somewhere(page: str):
    path = ROOT / page if (ROOT / page).exists() else ROOT / "docs" / page
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists() or (
            anchor and linked.suffix == ".md" and anchor not in _anchors(linked)
        ):
            broken.append(target)
    assert not broken, f"{page}: links to nothing: {broken}"

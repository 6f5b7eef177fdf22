"""The `lora-tuner` distribution: what it declares, what it pins, and the core alone at work.

- every third-party module tuner/ and trials/ import is declared, in the core or in an extra;
  an extra's modules are imported only inside functions, and only where the command that needs
  them lives, so the core never loads them;
- constraints.txt pins each declared distribution at a version its range allows, the one this
  environment runs (the versions the tests pass with), and the image and the KubeRay manifests
  run the pinned torch and Ray;
- in a fresh venv with the core alone (no extra), the SQLite quickstart runs end to end, and a
  command that needs an extra says which, in one line, exit 2.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tuner.common.extras import MODULES  # the module of each extra a laptop user goes without

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]
CORE = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
# Extras for this repository's own tooling, not for tuner's code; `all` only gathers the others.
NOT_FOR_THE_CODE = {"test", "bench", "all"}
BY_EXTRA = {
    extra: {canonicalize_name(Requirement(r).name) for r in requirements}
    for extra, requirements in EXTRAS.items()
    if extra not in NOT_FOR_THE_CODE
}
# Where each extra may be imported: the modules of the commands that need it (ray under
# tuner/backends/ only, as tests/test_architecture.py also says).
WHERE = {
    "ray": {"tuner/backends/ray.py", "tuner/backends/ray_job.py"},
    "deepspeed": {"trials/sft.py"},
    "postgres": set(),  # SQLAlchemy loads psycopg2 for a postgresql:// URL
    "dashboard": {"tuner/face/dashboard.py", "tuner/core/study.py"},
    "s3": {"tuner/store/_artifacts.py"},
    "tracking": {"tuner/trial/tracking.py"},
    "wandb": {"tuner/trial/tracking.py"},
    "qlora": set(),  # transformers loads bitsandbytes; tuner only looks for it (find_spec)
}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository, e.g. tuner/face/cli.py
    module: str  # the top-level module imported
    line: int
    lazy: bool  # inside a function, or only for type checkers: not run on import


def _imports() -> Iterator[Import]:
    for package in ("tuner", "trials"):
        for path in sorted((ROOT / package).rglob("*.py")):
            yield from _imports_of(path)


def _imports_of(path: Path) -> Iterator[Import]:
    file = str(path.relative_to(ROOT))

    def visit(node: ast.AST, lazy: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(file, alias.name.split(".")[0], node.lineno, lazy)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield Import(file, node.module.split(".")[0], node.lineno, lazy)
        function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        typing_only = isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for child in ast.iter_child_nodes(node):
            yield from visit(child, lazy or function or typing_only)

    yield from visit(ast.parse(path.read_text(), file), False)


THIRD_PARTY = [
    i
    for i in _imports()
    if i.module not in sys.stdlib_module_names and i.module not in ("tuner", "trials", "__future__")
]
_DISTRIBUTIONS = importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    """The distributions that provide `module` here; one not installed here is taken to be
    named as its module (wandb)."""
    return {canonicalize_name(d) for d in _DISTRIBUTIONS.get(module, [module])}


def _extras_of(module: str) -> set[str]:
    return {e for e, names in BY_EXTRA.items() if names & _distributions(module)}


def test_the_scan_sees_the_imports() -> None:
    modules = {i.module for i in THIRD_PARTY}
    assert {"optuna", "torch", "transformers", "ray", "deepspeed", "optuna_dashboard"} <= modules
    assert any(i.module == "optuna" and not i.lazy for i in THIRD_PARTY)
    assert all(i.lazy for i in THIRD_PARTY if i.module == "torch")


def test_every_direct_import_is_declared() -> None:
    undeclared = [
        f"{i.file}:{i.line} imports {i.module} ({', '.join(sorted(_distributions(i.module)))})"
        for i in THIRD_PARTY
        if not _distributions(i.module) & CORE and not _extras_of(i.module)
    ]
    assert not undeclared, "declare in pyproject.toml (core or an extra):\n" + "\n".join(undeclared)


def test_an_extra_is_imported_lazily_and_only_where_it_is_needed() -> None:
    wrong = []
    for i in THIRD_PARTY:
        if _distributions(i.module) & CORE:
            continue  # a core module may load anywhere
        for extra in _extras_of(i.module):
            if not i.lazy:
                wrong.append(f"{i.file}:{i.line}: {i.module} ('{extra}' extra) at module level")
            elif i.file not in WHERE[extra]:
                wrong.append(f"{i.file}:{i.line}: {i.module} ('{extra}' extra) outside {WHERE}")
    assert not wrong, "\n".join(wrong)


def test_all_is_every_extra_of_the_product() -> None:
    """`make setup`, CI and the image install `all`: every extra but W&B (an account of its own)."""
    (gathered,) = EXTRAS["all"]
    requirement = Requirement(gathered)
    assert canonicalize_name(requirement.name) == canonicalize_name(PYPROJECT["project"]["name"])
    assert requirement.extras == set(BY_EXTRA) - {"wandb"}
    assert set(WHERE) == set(BY_EXTRA)


# ----------------------------------------------------------------------------- constraints


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_constraints_pin_each_declared_distribution_within_its_range() -> None:
    pins = _pins()
    requirements = [*PYPROJECT["project"]["dependencies"]]
    requirements += [r for e, rs in EXTRAS.items() if e not in ("all", "wandb") for r in rs]
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt has no pin for {name} (pyproject.toml: {text})"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])


def test_constraints_are_the_versions_the_tests_run_with() -> None:
    """CI installs with constraints.txt, so this holds there; a venv that moved on must say so
    in constraints.txt (`make constraints`) once its tests pass."""
    moved = []
    for name, pinned in _pins().items():
        try:
            here = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra this environment goes without
        if Version(here.base_version) != pinned:  # torch 2.13.0+cpu is torch 2.13.0
            moved.append(f"{name}: constraints.txt {pinned}, installed {here}")
    assert not moved, "\n".join(moved)


def test_the_image_and_the_clusters_run_the_pinned_torch_and_ray() -> None:
    pins = _pins()
    dockerfile = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert "torch" not in base, f"{base}: a base image with its own torch, not the pinned one"
    installs = re.findall(r"pip install [^\n]*", dockerfile)
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    assert "COPY constraints.txt" in dockerfile
    assert any("'.[all]'" in line for line in installs)
    for path in sorted((ROOT / "deploy" / "kuberay").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            for version in _ray_versions(document):
                assert Version(version) == pins["ray"], f"{path.name}: rayVersion {version}"


def _ray_versions(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "rayVersion":
                yield str(value)
            yield from _ray_versions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _ray_versions(item)


# ----------------------------------------------------------------------------- the core alone


def _clean_env(venv: Path) -> dict[str, str]:
    """This machine's environment, less what would point the venv's tuner elsewhere (its
    TUNER_TORCH_THREADS stays: the machine's policy, not a study's)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
        and (not k.startswith("TUNER_") or k == "TUNER_TORCH_THREADS")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.slow
def test_the_sqlite_quickstart_runs_with_the_core_alone(tmp_path: Path) -> None:
    """A fresh venv, `pip install -c constraints.txt torch==2.13.0 -e .` (no extra), then the
    README's quickstart with that venv's `tuner`. Fails, never skips, when the venv cannot be
    built: that is what a user without the extras would meet."""
    venv = tmp_path / "venv"
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        # No pip inside: this test's pip installs into it (`--python`), which saves building one.
        made = subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)],
            capture_output=True,
            text=True,
        )
        assert made.returncode == 0, f"cannot make a venv: {made.stderr}"
        install = [
            *(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")),
            *("install", "--quiet", "--no-compile", "-c", str(ROOT / "constraints.txt")),
            *("torch==2.13.0", "-e", str(ROOT)),
        ]
        installed = subprocess.run(install, capture_output=True, text=True, timeout=900)
        timings["venv"] = time.monotonic() - started
        assert installed.returncode == 0, f"pip install failed:\n{installed.stderr[-3000:]}"

        python = str(venv / "bin" / "python")
        probe = subprocess.run(
            [
                *(python, "-c"),
                "import importlib.metadata as m, importlib.util as u, sys, tuner; "
                f"print([x for x in {sorted(MODULES.values())} if u.find_spec(x)]); "
                "print(m.version('lora-tuner') == tuner.__version__)",
            ],
            capture_output=True,
            text=True,
            env=_clean_env(venv),
        )
        assert probe.stdout.split() == ["[]", "True"], probe.stdout + probe.stderr

        _quickstart(venv, tmp_path / "work", timings)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~1 GB of torch
        print("core venv timings (s):", {k: round(v, 1) for k, v in timings.items()})


def _quickstart(venv: Path, work: Path, timings: dict[str, float]) -> None:
    work.mkdir()
    env = _clean_env(venv)
    tuner = str(venv / "bin" / "tuner")

    def run(*args: str) -> subprocess.CompletedProcess:
        started = time.monotonic()
        done = subprocess.run(
            [tuner, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        timings[" ".join(args)] = time.monotonic() - started
        return done

    def ok(*args: str) -> str:
        done = run(*args)
        assert done.returncode == 0, f"tuner {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    # The quickstart; the base barely pre-trained (2 steps, not 400: ~50 s saved on 2 cores),
    # as what it learns is not the point here.
    ok("demo", "prepare", "--pretrain-steps", "2")
    ok("study", "create", "--space", "quickstart.yaml")
    ok("study", "run", "quickstart", "--n-trials", "2", "--jobs", "2")
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{work / 'tuner.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2, study.trials
    assert "trial" in ok("study", "best", "quickstart")
    ok("study", "show", "quickstart")
    ok("study", "export", "quickstart", "--out", "best-model")
    assert (work / "best-model").is_dir()
    ok("study", "report", "quickstart", "--out", "report.html")
    assert (work / "report.html").stat().st_size > 0

    # A command that needs an extra says which, in one line, and exits 2.
    ds_space = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    ds_space["name"] = "zero"
    ds_space["fixed"]["deepspeed"] = "zero2"
    (work / "zero.yaml").write_text(yaml.safe_dump(ds_space))
    needs = {
        "ray": ("study", "run", "quickstart", "--n-trials", "1", "--backend", "ray"),
        "postgres": ("study", "list", "--storage", "postgresql://tuner@127.0.0.1:1/tuner"),
        "dashboard": ("dashboard",),
        "deepspeed": ("study", "create", "--space", "zero.yaml"),
    }
    for extra, args in needs.items():
        done = run(*args)
        lines = done.stderr.strip().splitlines()
        hint = f"needs the '{extra}' extra: pip install 'lora-tuner[{extra}]'"
        assert done.returncode == 2 and len(lines) == 1 and lines[0].endswith(hint), (
            f"tuner {' '.join(args)} -> {done.returncode}:\n{done.stderr}"
        )

"""`tuner study export`: a verified, traceable checkpoint that plain transformers loads."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import TUNER, mounted_tmpfs, run_cli, small_space, write_space
from safetensors.torch import load_file, save_file

from tuner.core import export as export_mod
from tuner.core.export import ExportError, export_trial
from tuner.core.study import create_study, run_study

# One process runs the module: its trained study is made once.
pytestmark = [pytest.mark.xdist_group("export")]

LOAD_AND_GENERATE = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer

out = sys.argv[1]
assert "tuner" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(out)
tokenizer = AutoTokenizer.from_pretrained(out)
ids = tokenizer.apply_chat_template(
    [{"role": "user", "content": "Reverse kalemo."}], add_generation_prompt=True,
    return_tensors="pt", return_dict=True,
)
generated = model.generate(**ids, max_new_tokens=8)
print(json.dumps({
    "text": tokenizer.decode(generated[0, ids["input_ids"].shape[1]:]),
    "temperature": model.generation_config.temperature,
    "top_p": model.generation_config.top_p,
    "do_sample": model.generation_config.do_sample,
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("tuner", "trials", "peft")),
}))
"""


@pytest.fixture(scope="module")
def study(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Three completed trials: two learning rates that learn, one that barely moves."""
    root = tmp_path_factory.mktemp("export")
    url = f"sqlite:///{root / 'studies.db'}"
    space = small_space(demo_dir, name="exp", pruner="none", budget={"n_trials": 3})
    space["fixed"] = {**space["fixed"], "temperature": 0.7, "top_p": 0.9}
    name = create_study(write_space(root / "exp.yaml", space), storage=url)
    opened = optuna.load_study(study_name=name, storage=url)
    for lr in (1e-2, 3e-3, 1e-5):
        opened.enqueue_trial({"learning_rate": lr, "lora_rank": 4, "lora_alpha/lora_rank": 2})
    assert run_study(name, storage=url).complete == 3
    return name, url


def test_the_best_trial_exports_as_a_checkpoint_plain_transformers_loads(
    study: tuple[str, str], tmp_path: Path
) -> None:
    name, url = study
    out = tmp_path / "best"
    with _umask(0o022):  # the export's process inherits it
        result = run_cli("study", "export", name, "--out", str(out), "--storage", url)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    # Readable by a serving account, as any save_pretrained is: folders 0755, files 0644.
    assert _modes(out) == {"folder": {0o755}, "file": {0o644}}

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "README.md", export_mod.PROVENANCE} <= files
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # no pickle anywhere
    assert "adapter_config.json" not in files  # merged: a plain model, not an adapter

    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_AND_GENERATE, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr
    facts = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert facts["modules"] == [] and facts["text"]
    assert (facts["temperature"], facts["top_p"], facts["do_sample"]) == (0.7, 0.9, True)

    provenance = json.loads((out / export_mod.PROVENANCE).read_text())
    best = optuna.load_study(study_name=name, storage=url).best_trial
    assert provenance["trial"]["number"] == best.number and provenance["trial"]["rank"] == 1
    assert provenance["trial"]["params"]["learning_rate"] == best.params["learning_rate"]
    assert len(provenance["dataset"]["sha256"]) == 64
    check = provenance["verification"]
    assert check["passed"] and check["greedy_tokens_equal"]
    assert check["max_logit_diff"] <= check["logit_tolerance"]
    assert abs(check["val_loss"] - best.user_attrs["eval_loss"]) < 1e-3
    card = (out / "README.md").read_text()
    assert f"trial {best.number} of the `tuner` study" in card
    assert "ranked 1 of 3 completed trials" in card


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(folder: Path) -> dict[str, set[int]]:
    modes: dict[str, set[int]] = {"folder": set(), "file": set()}
    for path in (folder, *folder.rglob("*")):
        modes["folder" if path.is_dir() else "file"].add(stat.S_IMODE(path.stat().st_mode))
    return modes


def test_trial_n_adapter_only_and_a_non_empty_destination(
    study: tuple[str, str], tmp_path: Path
) -> None:
    name, url = study
    out = tmp_path / "t2"
    with _umask(0o027):
        report = export_trial(name, out=out, storage=url, trial_number=2, adapter_only=True)
    assert report.trial == 2
    assert _modes(out) == {"folder": {0o750}, "file": {0o640}}  # what the umask allows
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / export_mod.PROVENANCE).read_text())["trial"]["rank"] == 3

    again = run_cli("study", "export", name, "--out", str(out), "--storage", url)
    assert again.returncode == 2 and "not empty" in again.stderr and "--force" in again.stderr
    forced = run_cli("study", "export", name, "--out", str(out), "--storage", url, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "adapter_config.json" not in {p.name for p in out.iterdir()}  # replaced, not mixed

    missing = run_cli("study", "export", name, "--out", str(tmp_path / "x"), "--trial", "9",
                      "--storage", url)  # fmt: skip
    assert missing.returncode == 2 and "trials 0..2" in missing.stderr


def test_a_corrupted_adapter_is_refused_and_nothing_is_left(
    study: tuple[str, str], tmp_path: Path
) -> None:
    name, url = study
    opened = optuna.load_study(study_name=name, storage=url)
    trial = opened.get_trials()[1]
    store = Path(opened.user_attrs["artifacts"])
    weights = store / trial.user_attrs["adapter"]["adapter_model.safetensors"]
    original = weights.read_bytes()
    tensors = load_file(weights)
    flipped = next(k for k in tensors if "lora_B" in k)
    tensors[flipped] = -tensors[flipped]
    save_file(tensors, weights)
    try:
        out = tmp_path / "bad"
        result = run_cli("study", "export", name, "--out", str(out), "--trial", "1",
                         "--storage", url)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert (
            "verification failed" in result.stderr and "not the one that trained" in result.stderr
        )
        assert not out.exists() and list(tmp_path.iterdir()) == []
    finally:
        weights.write_bytes(original)


def test_an_interrupted_export_leaves_nothing(
    study: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, url = study

    def interrupted(provenance: dict) -> str:
        raise KeyboardInterrupt  # Ctrl-C after the weights are written, before the rename

    monkeypatch.setattr(export_mod, "_model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_trial(name, out=tmp_path / "half", storage=url)
    assert list(tmp_path.iterdir()) == []


def test_the_model_card_names_no_password(pg_url: str, demo_dir: Path, tmp_path: Path) -> None:
    """The test server trusts local connections, so a URL with a password still connects."""
    user, rest = pg_url.split("://", 1)[1].split("@", 1)
    with_password = f"postgresql://{user.split(':')[0]}:s3cret-pw@{rest}"
    space = small_space(demo_dir, name="pw", pruner="none", budget={"n_trials": 1})
    name = create_study(write_space(tmp_path / "pw.yaml", space), storage=with_password)
    assert run_study(name, storage=with_password).complete == 1
    out = tmp_path / "out"
    result = run_cli("study", "export", name, "--out", str(out), "--storage", with_password)
    assert result.returncode == 0, result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
    for path in out.iterdir():
        if path.suffix in (".md", ".json"):
            assert "s3cret-pw" not in path.read_text(), path.name


def test_export_refuses_a_study_without_a_completed_trial(sqlite_url: str, demo_files: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    name = create_study(write_space(tmp_path / "e.yaml", small_space(demo_files, name="empty")),
                        storage=sqlite_url)  # fmt: skip
    with pytest.raises(ExportError, match="no completed trial"):
        export_trial(name, out=tmp_path / "o", storage=sqlite_url)
    assert not (tmp_path / "o").exists()


def test_only_the_best_adapters_are_kept_on_disk(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    """keep_adapters: 1. A weak first trial uploads (it is the best so far), a better one pushes
    it out, a worse third never uploads; export of a dropped trial says why."""
    space = small_space(demo_dir, name="keep", pruner="none")
    space["budget"] = {"n_trials": 3, "keep_adapters": 1}
    name = create_study(write_space(tmp_path / "k.yaml", space), storage=sqlite_url)
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    for lr in (1e-5, 1e-2, 3e-3):
        study.enqueue_trial({"learning_rate": lr, "lora_rank": 4, "lora_alpha/lora_rank": 2})
    assert run_study(name, storage=sqlite_url, jobs=1).complete == 3

    first, best, worse = study.get_trials()
    assert best.value < worse.value < first.value
    store = Path(study.user_attrs["artifacts"])
    on_disk = {p.name for p in store.iterdir() if p.is_file()}
    assert set(best.user_attrs["adapter"].values()) <= on_disk
    assert not set(first.user_attrs["adapter"].values()) & on_disk  # pushed out
    assert "adapter" not in worse.user_attrs and "best 1" in worse.user_attrs["adapter_dropped"]

    with pytest.raises(ExportError, match="keep_adapters"):
        export_trial(name, out=tmp_path / "first", storage=sqlite_url, trial_number=0)
    with pytest.raises(ExportError, match="has no adapter"):
        export_trial(name, out=tmp_path / "worse", storage=sqlite_url, trial_number=2)
    assert export_trial(name, out=tmp_path / "best", storage=sqlite_url).trial == best.number


def test_an_adapter_trained_with_zero3_exports_the_same_way(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    """ZeRO-3 shards the LoRA weights too; the trial saves them gathered, so the export loads,
    merges and verifies them like any other (DeepSpeed on the CPU, one process)."""
    space = small_space(demo_dir, name="z3", pruner="none", budget={"n_trials": 1})
    space["params"] = {"learning_rate": {"type": "categorical", "choices": [1e-2]}}
    space["fixed"] = {**space["fixed"], "deepspeed": "zero3", "max_steps": 10, "eval_steps": 10}
    name = create_study(write_space(tmp_path / "z3.yaml", space), storage=sqlite_url)
    assert run_study(name, storage=sqlite_url).complete == 1
    (trial,) = optuna.load_study(study_name=name, storage=sqlite_url).get_trials()
    assert trial.user_attrs["deepspeed_stage"] == 3

    report = export_trial(name, out=tmp_path / "out", storage=sqlite_url)
    assert report.verification.passed
    assert abs(report.verification.val_loss - trial.user_attrs["eval_loss"]) < 1e-3


# --- issue 22: i22-export ---


def _tree(*roots: Path) -> dict[str, int]:
    """Every path under the roots, with a file's size: what a refused export leaves as it was.
    The SQLite store's size is SQLite's: a reader that closes the last connection folds the
    write-ahead log into it. There it must be, and its log is left out."""
    found = {}
    for root in roots:
        for path in (root, *root.rglob("*")) if root.is_dir() else (root,):
            if path.name.endswith(("-wal", "-shm")):
                continue
            sized = path.is_file() and path.suffix != ".db"
            found[str(path)] = path.lstat().st_size if sized else -1
    return found


def test_an_export_never_replaces_what_it_must_not(
    study: tuple[str, str], demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out .`, `""`, `~`, `/`, the model, the data, the artifacts, the store, a symlink to
    any of them, a folder or file that is no export: refused with --force too, nothing touched."""
    name, url = study
    store = Path(url.removeprefix("sqlite:///"))
    artifacts = Path(optuna.load_study(study_name=name, storage=url).user_attrs["artifacts"])
    work, home, project = tmp_path / "work", tmp_path / "home", tmp_path / "project"
    for folder, file in ((work, "notes.txt"), (home, ".bashrc"), (project, "app.py")):
        folder.mkdir()
        (folder / file).write_text("a user's work\n")
    (tmp_path / "model.tar").write_bytes(b"not an export")
    (work / "sub").mkdir()
    (work / "here").symlink_to(work)
    (work / "base").symlink_to(demo_dir / "model")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    cases = [
        ("", "--out is empty"),
        (".", f"--out {work} is the working directory"),
        (str(tmp_path), f"--out {tmp_path} contains the"),  # the home and working directories
        ("~", f"--out {home} is the home folder"),
        ("/", "--out / is the root folder"),
        (demo_dir / "model", "is the base model"),
        (demo_dir / "model" / "best", "is inside the base model"),
        (demo_dir, "contains the base model"),
        (demo_dir / "data.jsonl", "is the data set"),
        (artifacts, "is the study's artifacts"),
        (artifacts / "best", "is inside the study's artifacts"),
        (store, "is the study store"),
        (store.parent, f"--out {store.parent} contains the study's"),
        ("here", f"--out {work} is the working directory"),  # symlinks resolved first
        ("base", f"--out {(demo_dir / 'model').resolve()} is the base model"),
        (project, "holds files that are not an export (no tuner_export.json)"),
        (tmp_path / "model.tar", "is a file, and --force replaces only an earlier export"),
    ]
    before = _tree(tmp_path, demo_dir, store.parent)
    for out, expected in cases:
        for force in (False, True):
            with pytest.raises(export_mod.destination.DestinationError) as refused:
                export_trial(name, out=out, storage=url, force=force)
            assert expected in str(refused.value), (out, force, str(refused.value))
    monkeypatch.chdir(work / "sub")
    with pytest.raises(export_mod.destination.DestinationError, match="contains the working"):
        export_trial(name, out=work, storage=url, force=True)
    monkeypatch.chdir(work)
    assert _tree(tmp_path, demo_dir, store.parent) == before

    # As a user types them: one line, exit 2, no traceback (`--out /` was one), nothing removed.
    env = {"HOME": str(home)}
    for args in (["--out", ""], ["--out", ".", "--force"], ["--out", "/", "--force"],
                 ["--out", str(demo_dir / "model")]):  # fmt: skip
        result = run_cli("study", "export", name, "--storage", url, *args, cwd=work, env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: --out ") and result.stderr.count("\n") == 1
    assert _tree(tmp_path, demo_dir, store.parent) == before


def test_a_replaced_export_and_a_killed_one_leave_nothing_beside_it(
    study: tuple[str, str], tmp_path: Path
) -> None:
    """--force moves the earlier export aside and removes it once the new one is there: nothing
    `.old` is left. An export killed midway leaves its half-built folder, which the next export
    to the same place removes."""
    name, url = study
    out = tmp_path / "best"
    command = [*TUNER, "study", "export", name, "--out", str(out), "--storage", url, "--force"]
    killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".best.export-*")) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        killed.kill()
        killed.wait()
    (left,) = tmp_path.glob(".best.export-*")
    assert str(killed.pid) in left.name

    export_trial(name, out=out, storage=url, trial_number=2, adapter_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    report = export_trial(name, out=out, storage=url, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    provenance = json.loads((out / export_mod.PROVENANCE).read_text())
    assert provenance["kind"] == "merged" and provenance["trial"]["number"] == report.trial


@pytest.fixture
def tmpfs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A small file system of the size (and options) the test asks for: tmpfs, mounted here."""
    with mounted_tmpfs(tmp_path / "disk", request.param) as mount:
        yield mount


FULL = (
    "no space left on the file system of {disk} for the export to {out}; "
    "free some or choose another --out"
)


@pytest.mark.parametrize(
    ("tmpfs", "expected"),
    [
        ("size=32k", FULL),
        ("size=1m", FULL),
        ("size=1m,ro", "cannot write the export to {out}: Read-only file system"),
    ],
    ids=["adapter does not fit", "merged weights do not fit", "read-only"],
    indirect=["tmpfs"],
)
def test_an_export_onto_a_full_or_read_only_disk_says_so_in_one_line(
    study: tuple[str, str], tmpfs: Path, expected: str
) -> None:
    """Not "not in the artifact store", not a traceback; and nothing half-written is left."""
    name, url = study
    out = tmpfs / "best"
    result = run_cli("study", "export", name, "--out", str(out), "--storage", url)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: {expected.format(disk=tmpfs, out=out)}\n", result.stderr
    assert list(tmpfs.iterdir()) == []

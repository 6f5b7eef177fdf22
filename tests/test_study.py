"""Real sweeps: real Optuna, real SQLite and PostgreSQL, real (tiny) LoRA fine-tunes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from conftest import TUNER, as_from_a_terminal, run_cli, small_space, write_space
from optuna.trial import TrialState

from trials import sft
from tuner.common.errors import StorageError
from tuner.core.study import best_report, create_study, run_study


def _states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials()]


def _assert_nothing_lost(study: optuna.Study) -> None:
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert all(math.isfinite(t.value) for t in trials if t.state == TrialState.COMPLETE)


def test_sweep_prunes_weak_trials_and_keeps_adapters(
    storage_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    """Baseline first, a good learning rate twice, then a hopeless one that the median pruner
    stops at its first evaluation; every completed trial leaves a loadable adapter."""
    space = small_space(demo_dir, baseline={"learning_rate": 5e-5, "lora_rank": 4, "lora_alpha": 8})
    path = write_space(tmp_path / "small.yaml", space)
    name = create_study(path, storage=storage_url)
    study = optuna.load_study(study_name=name, storage=storage_url)
    for lr in (1e-2, 1e-2, 1e-5):
        study.enqueue_trial({"learning_rate": lr, "lora_rank": 4, "lora_alpha/lora_rank": 2})

    progress = run_study(name, storage=storage_url, n_trials=4, jobs=1)

    study = optuna.load_study(study_name=name, storage=storage_url)
    trials = study.get_trials()
    assert _states(study) == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    assert (progress.complete, progress.pruned, progress.failed) == (3, 1, 0)
    assert trials[3].last_step == 10 < space["fixed"]["max_steps"]
    assert sorted(trials[1].intermediate_values) == [10, 20, 30]
    assert trials[0].user_attrs["baseline"] is True
    assert trials[1].value < trials[0].value - 1.0, "the learning rate must matter"
    assert trials[1].value == trials[2].value, "same params and seed, same result"
    _assert_nothing_lost(study)

    facts = trials[1].user_attrs
    assert facts["hparams"] == {"learning_rate": 1e-2, "lora_rank": 4, "lora_alpha": 8}
    assert facts["steps"] == 30 and facts["tokens_seen"] > 0
    assert facts["trainable_params"] < facts["total_params"]
    assert 0 <= facts["truncation_ratio"] < 1 and facts["train_loss"] > 0
    assert {"load_s", "data_s", "train_s", "store_s", "upload_s"} <= set(facts["timings"])
    # Measured inside the training steps: at least the rate over training with its evaluations.
    assert facts["tokens_per_s"] >= facts["tokens_seen"] / facts["timings"]["train_s"]
    assert facts["best_eval_step"] in (10, 20, 30)
    # No GPU here: nothing held, nothing spent; on a GPU both are measured.
    assert facts["peak_mem_gb"] is None and facts["gpu_hours"] == 0

    report = best_report(name, storage_url)
    assert report["trial"] in (1, 2)
    assert report["params"]["lora_alpha"] == 8
    assert report["baseline"]["trial"] == 0 and report["baseline"]["improvement"] > 1.0

    _assert_adapter_loads(study, trials[1], demo_dir, tmp_path)
    assert not optuna.artifacts.get_all_artifact_meta(trials[3], storage=study._storage)


def _assert_adapter_loads(study: optuna.Study, trial, demo_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuner.store._attrs import ARTIFACTS

    store = optuna.artifacts.FileSystemArtifactStore(study.user_attrs[ARTIFACTS])
    target = tmp_path / "adapter"
    target.mkdir()
    for meta in optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage):
        optuna.artifacts.download_artifact(
            artifact_store=store,
            artifact_id=meta.artifact_id,
            file_path=str(target / meta.filename),
        )
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert json.loads((target / "adapter_config.json").read_text())["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(demo_dir / "model")
    model = PeftModel.from_pretrained(base, target)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_workers_share_the_store_and_any_machine_can_continue(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    """Two worker processes finish exactly the trials asked for; then a process that has only
    the storage URL (no YAML, another directory) runs one more; Optuna's own tools read it."""
    path = write_space(tmp_path / "small.yaml", small_space(demo_dir))
    name = create_study(path, storage=sqlite_url)
    progress = run_study(name, storage=sqlite_url, n_trials=3, jobs=2)
    assert progress.finished == 3

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path.unlink()
    result = run_cli(
        "study", "run", name, "--storage", sqlite_url, "--n-trials", "1", cwd=elsewhere
    )
    assert result.returncode == 0, result.stderr
    assert "1 trial finished:" in result.stdout

    study = optuna.load_study(study_name=name, storage=sqlite_url)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 4
    assert len({tuple(sorted(t.params.items())) for t in study.get_trials()}) == 4
    _assert_nothing_lost(study)

    listed = subprocess.run(
        [str(Path(TUNER[0]).with_name("optuna")), "studies", "--storage", sqlite_url, "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [s["name"] for s in json.loads(listed.stdout)] == [name]


def test_a_sweep_tokenises_its_data_once(sqlite_url: str, demo_dir: Path, tmp_path: Path) -> None:
    """Two workers, four trials: one trial tokenises, the other worker loads that from the
    study's artifact folder, and later trials reuse their worker's copy in memory."""
    space = small_space(demo_dir, pruner="none")
    name = create_study(write_space(tmp_path / "s.yaml", space), storage=sqlite_url)
    assert run_study(name, storage=sqlite_url, n_trials=4, jobs=2).complete == 4

    study = optuna.load_study(study_name=name, storage=sqlite_url)
    sources = [t.user_attrs["data_source"] for t in study.get_trials()]
    assert sources.count("tokenized") == 1, sources
    assert "shared" in sources, sources
    assert set(sources) <= {"tokenized", "shared", "memory"}


def test_a_deepspeed_zero2_sweep_trains_through_the_trainer_on_cpu(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    """`fixed.deepspeed: zero2`, one process on the CPU: every trial trains under DeepSpeed
    (the HF Trainer's integration, `auto` values from the trial), the second on the kept base."""
    space = small_space(demo_dir, pruner="none")
    space["fixed"] = {**space["fixed"], "deepspeed": "zero2", "max_steps": 10, "eval_steps": 5}
    name = create_study(write_space(tmp_path / "ds.yaml", space), storage=sqlite_url)
    assert run_study(name, storage=sqlite_url, n_trials=2, jobs=1).complete == 2

    trials = optuna.load_study(study_name=name, storage=sqlite_url).get_trials()
    assert [t.user_attrs["deepspeed_stage"] for t in trials] == [2, 2]
    assert all(t.user_attrs["steps"] == 10 and "adapter" in t.user_attrs for t in trials)
    assert trials[1].user_attrs["data_source"] == "memory"  # the same worker, kept warm


def test_budget_is_the_default_number_of_trials(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    space = small_space(demo_dir, budget={"n_trials": 2}, pruner="none")
    name = create_study(write_space(tmp_path / "s.yaml", space), storage=sqlite_url)
    assert run_study(name, storage=sqlite_url, jobs=2).finished == 2
    assert run_study(name, storage=sqlite_url, jobs=2).finished == 0  # budget reached


def test_nan_loss_and_errors_fail_the_trial_and_the_study_goes_on(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    diverging = small_space(demo_dir, name="diverging")
    diverging["params"] = {"lora_rank": {"type": "categorical", "choices": [4]}}
    diverging["fixed"] = {**diverging["fixed"], "learning_rate": 1e30, "max_grad_norm": 1e30}
    name = create_study(write_space(tmp_path / "nan.yaml", diverging), storage=sqlite_url)
    progress = run_study(name, storage=sqlite_url, n_trials=1)
    (trial,) = optuna.load_study(study_name=name, storage=sqlite_url).get_trials()
    assert progress.failed == 1 and trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "nan"
    assert re_any(trial.user_attrs["fail_detail"], ("nan", "inf"))
    # Stopped at the diverged step itself, before the first evaluation (step 10).
    assert trial.user_attrs["timings"]["stopped_at_step"] < 10
    with pytest.raises(StorageError, match="no completed trial"):
        best_report(name, sqlite_url)

    broken = small_space(demo_dir, name="broken")
    broken["fixed"] = {**broken["fixed"], "lora_target": ["no_such_module"]}
    name = create_study(write_space(tmp_path / "broken.yaml", broken), storage=sqlite_url)
    progress = run_study(name, storage=sqlite_url, n_trials=2)
    trials = optuna.load_study(study_name=name, storage=sqlite_url).get_trials()
    assert progress.failed == 2 and _states_of(trials) == [TrialState.FAIL] * 2
    assert "no_such_module" in trials[0].user_attrs["fail_reason"]


@pytest.mark.slow
def test_a_run_whose_trials_keep_failing_the_same_way_stops_and_names_the_error(
    sqlite_url: str, demo_files: Path, tmp_path: Path
) -> None:
    """A set-up every trial trips on (a base model folder without its weights: create loads
    only its config and tokenizer): the run stops after `resources.max_identical_failures` (3)
    alike failures, not the whole budget, and says why; 0 turns the check off, and the budget
    runs out as before."""
    broken = small_space(demo_files, name="broken", budget={"n_trials": 8}, pruner="none")
    name = create_study(write_space(tmp_path / "broken.yaml", broken), storage=sqlite_url)
    progress = run_study(name, storage=sqlite_url)
    trials = optuna.load_study(study_name=name, storage=sqlite_url).get_trials()
    assert _states_of(trials) == [TrialState.FAIL] * 3 and progress.failed == 3
    reason = trials[0].user_attrs["fail_reason"]
    assert all(t.user_attrs["fail_reason"] == reason for t in trials), reason
    assert progress.stop_reason is not None and progress.stop_reason.startswith(
        "3 trials in a row failed with the same error"
    )
    assert progress.stop_reason.endswith(reason), progress.stop_reason

    patient = {**broken, "name": "patient", "budget": {"n_trials": 4}}
    patient["resources"] = {"max_identical_failures": 0}
    name = create_study(write_space(tmp_path / "patient.yaml", patient), storage=sqlite_url)
    progress = run_study(name, storage=sqlite_url)
    assert progress.failed == 4 and progress.stop_reason is None


def re_any(text: str, words: tuple[str, ...]) -> bool:
    return any(w in text.lower() for w in words)


def _states_of(trials: list) -> list[TrialState]:
    return [t.state for t in trials]


def _slow_space(demo_dir: Path) -> dict:
    space = small_space(demo_dir, name="slow", pruner="none")
    space["fixed"] = {**space["fixed"], "max_steps": 150}
    return space


def _start_run(name: str, url: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*TUNER, "study", "run", name, "--storage", url, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=as_from_a_terminal,
    )


def _wait_for_training(study: optuna.Study, timeout: float = 120) -> optuna.trial.FrozenTrial:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = study.get_trials(states=(TrialState.RUNNING,))
        if running and running[0].intermediate_values:
            return running[0]
        time.sleep(0.3)
    raise AssertionError("no trial started training in time")


def _worker_pids(driver_pid: int) -> list[int]:
    """The run's workers: the processes under it that lead a process group of their own (a
    worker's first act), whether spawned by the driver or forked by its fork server."""
    import psutil

    workers = []
    for process in psutil.Process(driver_pid).children(recursive=True):
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(process.pid) == process.pid:
                workers.append(process.pid)
    return workers


def test_ctrl_c_leaves_no_trial_running_and_a_rerun_continues(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    name = create_study(
        write_space(tmp_path / "slow.yaml", _slow_space(demo_dir)), storage=sqlite_url
    )
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    run = _start_run(name, sqlite_url, "--n-trials", "2", "--jobs", "2")
    _wait_for_training(study)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert "run `tuner study run" in stderr
    trials = study.get_trials()
    assert trials and all(t.state == TrialState.FAIL for t in trials)
    assert all("interrupted" in t.user_attrs["fail_reason"] for t in trials)

    result = run_cli("study", "run", name, "--storage", sqlite_url, "--n-trials", "1")
    assert result.returncode == 0, result.stderr
    assert len(study.get_trials()) == len(trials) + 1
    _assert_nothing_lost(study)


def test_a_killed_worker_fails_its_trial_which_is_retried(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    space = small_space(demo_dir, name="killed", pruner="none")
    space["fixed"] = {**space["fixed"], "eval_steps": 5}
    name = create_study(write_space(tmp_path / "s.yaml", space), storage=sqlite_url)
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    run = _start_run(name, sqlite_url, "--n-trials", "3", "--jobs", "1")
    victim = _wait_for_training(study)
    (worker,) = _worker_pids(run.pid)
    os.kill(worker, signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    failed = study.trials[victim.number]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == "worker process died (exit code -9)"
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.params == failed.params and retry.state == TrialState.COMPLETE
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    _assert_nothing_lost(study)


def test_heartbeats_fail_the_trials_of_a_crashed_run(
    pg_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    """Driver and workers killed at once: their trial stays RUNNING until the next run finds
    its heartbeat stale and fails it."""
    beats = {"TUNER_HEARTBEAT_INTERVAL": "1", "TUNER_GRACE_PERIOD": "3"}
    name = create_study(write_space(tmp_path / "slow.yaml", _slow_space(demo_dir)), storage=pg_url)
    study = optuna.load_study(study_name=name, storage=pg_url)
    run = _start_run(name, pg_url, "--n-trials", "1", env=beats)
    crashed = _wait_for_training(study)
    for pid in [*_worker_pids(run.pid), run.pid]:
        os.kill(pid, signal.SIGKILL)
    run.wait()
    assert study.trials[crashed.number].state == TrialState.RUNNING
    time.sleep(4)

    result = run_cli("study", "run", name, "--storage", pg_url, "--n-trials", "1", env=beats)
    assert result.returncode == 0, result.stderr
    assert study.trials[crashed.number].state == TrialState.FAIL
    _assert_nothing_lost(study)


def test_concurrent_creates_of_one_name(pg_url: str, tmp_path: Path) -> None:
    """Four `study create` of one name at once: one creates it (its baseline enqueued once), the
    others say it exists. The simulated workload: the race is the store's, and a space with a
    model and data spent 7 s of CPU a process checking them first."""
    lr = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}
    space = {
        "name": "race",
        "params": {"learning_rate": lr},
        "fixed": {"workload": "simulated"},
        "baseline": {"learning_rate": 1e-3},
    }
    path = write_space(tmp_path / "race.yaml", space)

    def create_many(*extra: str) -> list[subprocess.CompletedProcess]:
        procs = [
            subprocess.Popen(
                [*TUNER, "study", "create", "--space", str(path), "--storage", pg_url, *extra],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        return [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]

    results = create_many()
    assert sorted(rc for rc, _, _ in results) == [0, 2, 2, 2]
    for rc, out, err in results:
        if rc == 2:
            assert "already exists" in err and "--load-if-exists" in err and "Traceback" not in err
        else:
            assert out.strip() == "race"

    assert all(rc == 0 for rc, _, _ in create_many("--load-if-exists"))
    study = optuna.load_study(study_name="race", storage=pg_url)
    assert optuna.get_all_study_names(pg_url) == ["race"]
    assert len(study.get_trials()) == 1  # the baseline, enqueued once

    narrower = {"learning_rate": {**lr, "high": 1e-2}}
    changed = write_space(tmp_path / "race.yaml", {**space, "params": narrower})
    result = run_cli(
        "study", "create", "--space", str(changed), "--storage", pg_url, "--load-if-exists"
    )
    assert result.returncode == 2 and "exists with a different space" in result.stderr


def test_out_of_memory_halves_the_batch_once_then_fails_with_a_constraint(
    sqlite_url: str, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real torch.cuda.OutOfMemoryError, raised from inside the training step above a
    per-device batch (there is no GPU here to fill): batch 8 → 4 with twice the accumulation
    trains; when 4 runs out of memory too, the trial ends FAIL with `fail_reason=oom` and a
    constraint the sampler learns from. The trials run through tuner's own worker, in this
    process, so that the step patched here is the one that trains."""
    import torch

    from tuner.backends.worker import Worker, WorkerSpec

    space = small_space(demo_dir, name="oom", budget={"n_trials": 1})
    space["params"] = {"lora_rank": {"type": "categorical", "choices": [4]}}
    space["fixed"] = {**space["fixed"], "per_device_train_batch_size": 8}
    path = write_space(tmp_path / "oom.yaml", space)

    trainer_class = sft._trainer_class()
    train_step = trainer_class.training_step
    fits = {"batch": 4}

    def short_of_memory(trainer: object, *args: object, **kwargs: object) -> object:
        if trainer.args.per_device_train_batch_size > fits["batch"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train_step(trainer, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "training_step", short_of_memory)

    def run_here(name: str, n_trials: int) -> list:
        worker = Worker(WorkerSpec(name, sqlite_url, worker="here", index=0, threads=2))
        for _ in range(n_trials):
            worker.run_one()
        return optuna.load_study(study_name=name, storage=sqlite_url).get_trials()

    (trial,) = run_here(create_study(path, storage=sqlite_url), 1)
    assert trial.state == TrialState.COMPLETE and math.isfinite(trial.value)
    attrs = trial.user_attrs
    assert (attrs["per_device_train_batch_size"], attrs["gradient_accumulation_steps"]) == (4, 2)
    assert attrs["oom_retries"] == 1 and attrs["steps"] == 30
    assert trial.constraints == {}

    fits["batch"] = 2
    name = create_study(
        write_space(tmp_path / "oom2.yaml", {**space, "name": "oom2"}), storage=sqlite_url
    )
    trials = run_here(name, 2)
    assert _states_of(trials) == [TrialState.FAIL] * 2
    for trial in trials:  # the second trial ran: the first one's memory did not stay behind
        assert trial.user_attrs["fail_reason"] == "oom"
        assert "per-device batch 4, already halved once" in trial.user_attrs["fail_detail"]
        assert trial.constraints == {"oom": 1.0}

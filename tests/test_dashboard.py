"""`tuner dashboard` and `tuner study report`, in a real headless Chromium (Debian's, no download).

The study behind them is a real sweep of the simulated workload with a complete, a pruned and
a failed trial. Screenshots go to $TUNER_SCREENSHOTS (default: build/screenshots), to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from conftest import TUNER, run_cli, write_space

from tuner.core.study import create_study, run_study

# One process runs the module: its sweep and its browser are made once.
pytestmark = [pytest.mark.server, pytest.mark.xdist_group("dashboard")]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = Path(os.environ.get("TUNER_SCREENSHOTS", ROOT / "build" / "screenshots"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "s3cret-dashboard-token-0123"


def simulated_space(**fixed: object) -> dict:
    return {
        "name": "live",
        "description": "Simulated curves for the dashboard test.",
        "params": {
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
            "lora_rank": {"type": "categorical", "choices": [4, 8, 16]},
        },
        "fixed": {
            "workload": "simulated",
            "steps": 6,
            "step_seconds": 0.05,
            "diverge_above_lr": 3e-2,
            **fixed,
        },
        "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 2},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
        "budget": {"n_trials": 5},
    }


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A finished sweep: two good trials, one pruned (lr far too low), one failed (NaN)."""
    root = tmp_path_factory.mktemp("dash")
    url = f"sqlite:///{root / 'studies.db'}"
    name = create_study(write_space(root / "live.yaml", simulated_space()), storage=url)
    study = optuna.load_study(study_name=name, storage=url)
    for lr, rank in ((1e-3, 16), (2e-3, 8), (1e-5, 4), (5e-2, 8)):
        study.enqueue_trial({"learning_rate": lr, "lora_rank": rank})
    run_study(name, storage=url, n_trials=5)
    states = [t.state for t in study.get_trials()]
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.FAIL in states
    return name, url


@contextmanager
def dashboard(url: str, *flags: str, env: dict | None = None) -> Iterator[str]:
    """`tuner dashboard` on a free port; yields its base URL."""
    proc = subprocess.Popen(
        [*TUNER, "dashboard", "--storage", url, "--port", "0", *flags],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            found = re.search(r"(http://\S+?)/dashboard", line)
            if found:
                break
        assert found, f"dashboard did not start: {''.join(lines)}"
        drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        drain.start()  # a full pipe would block the server
        yield found[1]
    finally:
        proc.terminate()  # SIGTERM: how systemd and docker stop it
        proc.wait(timeout=10)
    assert proc.returncode == 0, "".join(lines)


def study_id(base: str, name: str) -> int:
    """The dashboard's id of study `name`, from its API."""
    studies = get_json(f"{base}/api/studies")["study_summaries"]
    (study,) = (s for s in studies if s["study_name"] == name)
    return study["study_id"]


def study_trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


def http(method: str, url: str, *, body: dict | None = None, headers: dict | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def get_json(url: str, headers: dict | None = None) -> dict:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is required: apt-get install chromium"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def open_page(browser: object) -> tuple[object, list[str]]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return page, errors


def test_the_dashboard_shows_the_study_its_history_and_a_trials_curve(
    swept: tuple[str, str], browser: object
) -> None:
    name, url = swept
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with dashboard(url) as base:
        assert base.startswith("http://127.0.0.1:")
        sid = study_id(base, name)
        detail = get_json(f"{base}/api/studies/{sid}")
        assert "Simulated curves for the dashboard test." in detail["note"]["body"]

        page, errors = open_page(browser)
        page.goto(f"{base}/dashboard")
        page.get_by_text(f"{sid}. {name}", exact=True).wait_for(timeout=30_000)
        page.screenshot(path=str(SCREENSHOTS / "dashboard-studies.png"), full_page=True)

        page.goto(f"{base}/dashboard/studies/{sid}")
        # Plotly drew the history: one marker per finished trial with a value, pruned included.
        page.wait_for_function(
            "document.querySelectorAll('.js-plotly-plot .scatterlayer .point').length >= 4",
            timeout=30_000,
        )
        page.screenshot(path=str(SCREENSHOTS / "dashboard-study.png"), full_page=True)

        page.goto(f"{base}/dashboard/studies/{sid}/trials")
        page.get_by_text("5 Trials", exact=True).wait_for(timeout=30_000)
        page.get_by_text("Trial 2", exact=True).click()  # the pruned one: stopped at step 3
        page.get_by_text("Intermediate Values", exact=True).wait_for()
        pruned = study_trials(url, name)[2]
        assert pruned.state == optuna.trial.TrialState.PRUNED
        for step, value in pruned.intermediate_values.items():
            page.get_by_text(f"{step} {value}", exact=True).wait_for()
        page.screenshot(path=str(SCREENSHOTS / "dashboard-trial.png"), full_page=True)

        page.goto(f"{base}/dashboard/studies/{sid}/note")
        page.get_by_text("Simulated curves for the dashboard test.").wait_for(timeout=30_000)
        page.close()
    assert not [e for e in errors if "favicon" not in e], errors


def test_intermediate_values_appear_while_trials_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    # Whatever learning rate is drawn, the one trial must run long enough to be watched.
    space = simulated_space(steps=40, step_seconds=0.25, diverge_above_lr=None)
    name = create_study(write_space(tmp_path / "slow.yaml", space), storage=url)
    runner = threading.Thread(
        target=run_study, args=(name,), kwargs={"storage": url, "n_trials": 1}
    )
    runner.start()
    try:
        with dashboard(url) as base:
            (study,) = get_json(f"{base}/api/studies")["study_summaries"]
            deadline = time.monotonic() + 60
            live = None
            while time.monotonic() < deadline and live is None:
                trials = get_json(f"{base}/api/studies/{study['study_id']}")["trials"]
                live = next(
                    (t for t in trials if t["state"] == "Running" and t["intermediate_values"]),
                    None,
                )
                time.sleep(0.5)
            assert live is not None, "no running trial with reported values was shown"
    finally:
        runner.join(timeout=120)


def test_read_only_refuses_writes_and_the_study_is_unchanged(swept: tuple[str, str]) -> None:
    name, url = swept
    study = optuna.load_study(study_name=name, storage=url)
    before = [(t.number, t.state, t.value) for t in study.get_trials()]
    with dashboard(url, "--read-only") as base:
        sid = study_id(base, name)
        assert http("DELETE", f"{base}/api/studies/{sid}") == 403
        assert (
            http("PUT", f"{base}/api/studies/{sid}/note", body={"version": 9, "body": "x"}) == 403
        )
        trial_id = study.get_trials()[0]._trial_id
        assert http("POST", f"{base}/api/trials/{trial_id}/tell", body={"state": "Fail"}) == 403
        assert http("GET", f"{base}/api/studies/{sid}") == 200
    after = optuna.load_study(study_name=name, storage=url)
    assert [(t.number, t.state, t.value) for t in after.get_trials()] == before


def test_writes_from_another_site_are_refused(swept: tuple[str, str]) -> None:
    name, url = swept
    with dashboard(url) as base:
        sid = study_id(base, name)
        note = f"{base}/api/studies/{sid}/note"
        evil = {"Origin": "http://evil.example", "Content-Type": "application/json"}
        assert http("PUT", note, body={"version": 99, "body": "pwned"}, headers=evil) == 403
        assert "pwned" not in get_json(f"{base}/api/studies/{sid}")["note"]["body"]


def test_a_token_is_required_on_every_request(swept: tuple[str, str], browser: object) -> None:
    _, url = swept
    # From the environment, so it never shows in the process list.
    with dashboard(url, "--host", "0.0.0.0", env={"TUNER_DASHBOARD_TOKEN": TOKEN}) as base:
        local = base.replace("0.0.0.0", "127.0.0.1")
        assert http("GET", f"{local}/api/studies") == 401
        assert http("GET", f"{local}/dashboard") == 401
        assert http("GET", f"{local}/api/studies", headers={"Authorization": "Bearer wrong"}) == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert http("GET", f"{local}/api/studies", headers=bearer) == 200

        # A person opens the link once; a cookie carries the token from then on, and the
        # token leaves the address bar.
        page, _ = open_page(browser)
        page.goto(f"{local}/dashboard?token={TOKEN}")
        page.get_by_text("1. live", exact=True).wait_for(timeout=30_000)
        assert "token" not in page.url
        page.close()


def test_exposing_a_writable_dashboard_without_a_token_is_refused(
    swept: tuple[str, str],
) -> None:
    _, url = swept
    refused = run_cli("dashboard", "--storage", url, "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "--read-only" in refused.stderr and "--token" in refused.stderr
    short = run_cli("dashboard", "--storage", url, "--port", "0", "--token", "abc", timeout=60)
    assert short.returncode == 2 and "at least 16 characters" in short.stderr
    with dashboard(url, "--host", "0.0.0.0", "--read-only") as base:
        assert http("GET", base.replace("0.0.0.0", "127.0.0.1") + "/api/studies") == 200


def test_the_report_opens_in_chromium_with_its_plots_and_no_errors(
    swept: tuple[str, str], browser: object, tmp_path: Path
) -> None:
    name, url = swept
    out = tmp_path / "report.html"
    made = run_cli("study", "report", name, "--storage", url, "--out", str(out), timeout=120)
    assert made.returncode == 0, made.stderr
    assert "6 plots" in made.stdout, made.stdout + made.stderr

    text = out.read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # to share: not a private temp file
    assert "<script src=" not in text  # self-contained: opens with no network
    assert f"tuner study export {name}" in text
    assert "nan" in text  # the failed trial's reason is in the table

    page, errors = open_page(browser)
    page.goto(out.as_uri())
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 6")
    assert page.locator("table.trials tbody tr").count() == 5
    assert page.locator("tr.pruned").count() >= 1 and page.locator("tr.fail").count() == 1
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "report.png"), full_page=True)
    page.close()
    assert errors == []

    # Attached to the study: the dashboard lists it among the study's artifacts and serves it.
    with dashboard(url) as base:
        sid = study_id(base, name)
        artifacts = get_json(f"{base}/api/studies/{sid}")["artifacts"]
        (report,) = (a for a in artifacts if a["filename"] == "report.html")
        served = f"{base}/artifacts/{sid}/{report['artifact_id']}"
        with urllib.request.urlopen(served, timeout=30) as response:
            assert response.read() == out.read_bytes()


# --- issue 22: i22-delete ---


@pytest.fixture
def fresh(tmp_path: Path) -> tuple[str, str]:
    """A study of its own in a new store, for tests that write or delete."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    space = simulated_space(steps=3, step_seconds=0.01, diverge_above_lr=None)
    name = create_study(
        write_space(tmp_path / "live.yaml", space), storage=url, artifacts=str(tmp_path / "a")
    )
    return name, url


def _port(base: str) -> str:
    return base.rsplit(":", 1)[1]


def test_a_rebound_page_can_neither_create_nor_delete_nor_read_in_any_mode(
    fresh: tuple[str, str],
) -> None:
    """DNS rebinding: a page at evil.example, its name now resolving to 127.0.0.1, sends its
    own name as Host and as Origin, so the Origin check passed. Before: 201 and 204 (a study
    made, the study deleted), and the read-only dashboard served its studies."""
    name, url = fresh
    with dashboard(url) as base:
        port = _port(base)
        json_body = {"Content-Type": "application/json"}
        evil = {
            "Host": f"evil.example:{port}",
            "Origin": f"http://evil.example:{port}",
            **json_body,
        }
        sid = study_id(base, name)
        body = {"study_name": "planted", "directions": ["minimize"]}
        assert http("POST", f"{base}/api/studies", body=body, headers=evil) == 421
        assert http("DELETE", f"{base}/api/studies/{sid}", headers=evil) == 421
        assert http("GET", f"{base}/api/studies", headers={"Host": f"evil.example:{port}"}) == 421
        for same in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert http("GET", f"{base}/api/studies", headers={"Host": same}) == 200, same
        for odd in (f"evil.example@127.0.0.1:{port}", f"127.0.0.1.evil.example:{port}", ""):
            assert http("GET", f"{base}/api/studies", headers={"Host": odd}) == 421, odd
        request = urllib.request.Request(
            f"{base}/api/studies", headers={"Host": f"evil.example:{port}"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        reason = json.load(refused.value)["reason"]
        assert "--allow-host" in reason and "127.0.0.1" in reason and len(reason) < 300
        # The dashboard itself still writes: its own page, same origin, own name.
        own = {"Origin": base, **json_body}
        assert http("POST", f"{base}/api/studies", body=body, headers=own) == 201
    assert sorted(optuna.get_all_study_names(url)) == sorted([name, "planted"])

    with dashboard(url, "--read-only", "--allow-host", "tuner.test") as base:
        port = _port(base)
        assert http("GET", f"{base}/api/studies", headers={"Host": f"evil.example:{port}"}) == 421
        assert http("GET", f"{base}/api/studies", headers={"Host": f"tuner.test:{port}"}) == 200
        assert http("GET", f"{base}/api/studies", headers={"Host": "Tuner.Test."}) == 200

    # Bound to every interface: any address of the machine, never a name it was not given.
    with dashboard(url, "--host", "0.0.0.0", env={"TUNER_DASHBOARD_TOKEN": TOKEN}) as base:
        local = base.replace("0.0.0.0", "127.0.0.1")
        port = _port(base)
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert http("GET", f"{local}/api/studies", headers=bearer) == 200
        assert http("GET", f"{local}/api/studies", headers={**bearer, **evil}) == 421
        ip = {**bearer, "Host": f"10.1.2.3:{port}"}
        assert http("GET", f"{local}/api/studies", headers=ip) == 200
    assert sorted(optuna.get_all_study_names(url)) == sorted([name, "planted"])


def test_the_dashboards_delete_refuses_a_running_study_and_removes_a_finished_one(
    tmp_path: Path,
) -> None:
    """The Delete button while a run trains: before, optuna-dashboard removed the artifacts,
    then the rows (or not: it said 204 either way), and the run died in tracebacks. Now 409,
    naming the running trials, and the run goes on; once it is done, 204 and all gone."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    # Trials of 20 s: still running when the delete arrives, on a loaded machine too.
    space = simulated_space(steps=200, step_seconds=0.1, diverge_above_lr=None)
    artifacts = tmp_path / "a"
    name = create_study(
        write_space(tmp_path / "slow.yaml", space), storage=url, artifacts=str(artifacts)
    )
    result: dict = {}
    runner = threading.Thread(
        target=lambda: result.update(progress=run_study(name, storage=url, n_trials=2, jobs=2))
    )
    runner.start()
    try:
        with dashboard(url) as base:
            sid = study_id(base, name)
            deadline = time.monotonic() + 120
            while not any(t.state.name == "RUNNING" for t in study_trials(url, name)):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            request = urllib.request.Request(f"{base}/api/studies/{sid}", method="DELETE")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=60)
            assert refused.value.code == 409
            assert f"study {name!r} is running: trial " in json.load(refused.value)["reason"]
            runner.join(timeout=120)
            assert result["progress"].complete == 2  # the run went on, untouched
            from tuner.face.report import write_report

            write_report(name, out=tmp_path / "report.html", storage=url)
            assert any(artifacts.iterdir())
            assert http("DELETE", f"{base}/api/studies/{sid}") == 204
            assert http("GET", f"{base}/api/studies/{sid}") == 404
    finally:
        runner.join(timeout=120)
    assert optuna.get_all_study_names(url) == []
    assert [p for p in artifacts.rglob("*") if p.is_file()] == []

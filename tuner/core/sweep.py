"""Recurring sweeps: one study per day of a series, warm-started, budgeted, promoting a champion.

A series is a name prefix; its sweeps are the studies `PREFIX-YYYY-MM-DD`. `run_sweep` holds
the series lock (tuner/store/_locks.py) for its whole life, so a cron retry or a slow night never
has two drivers. It creates today's study (or resumes it: a sweep killed at 3 a.m. continues
from its finished trials), enqueues the previous sweep's best params first, runs to the space's
budget, then compares today's best with the series' champion and promotes it only when it is
better by `sweep.margin`: exported (with the export's verification) and pointed at by
`OUT/champion`.

Everything a later sweep needs is in the store (the study attr `sweep`); `OUT` holds the
summaries (JSON and Markdown) and the exported champions.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner import backends
from tuner.common.errors import RunFailed, TunerError
from tuner.common.limits import check_series
from tuner.core import destination
from tuner.core.study import (
    Progress,
    _done,
    baseline_trial,
    create_study,
    run_study,
)
from tuner.space import Space, from_stored, load_space
from tuner.store import (
    attrs,
    best_trial,
    gain,
    gpu_hours_held,
    mask_url,
    open_storage,
    open_study,
    rank_key,
    resolve_url,
    series_lock,
    state_counts,
)

if TYPE_CHECKING:
    from tuner.backends import Submitted

logger = logging.getLogger(__name__)

SWEEP_ATTR = attrs.SWEEP  # the study's sweep summary, champion included; written when it ends
WARM_START_ATTR = attrs.WARM_START  # on a trial enqueued from the previous sweep: "STUDY#N"
_SERIES = re.compile(r"^(?P<prefix>.+)-(?P<date>\d{4}-\d{2}-\d{2})$")


class ExportFailed(TunerError):
    """The sweep ran, but its new best could not be exported; the champion is unchanged."""


def run_sweep(
    space: str | Path,
    *,
    prefix: str | None = None,
    storage: str | None = None,
    backend: str = "local",
    address: str | None = None,
    jobs: int | None = None,
    date: dt.date | None = None,
    wait: bool = False,
    out: str | Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """One sweep of the series; returns its summary. `locks.Busy` if one is running already."""
    parsed = load_space(space)
    prefix = _series(prefix, parsed, str(space))
    date = date or dt.date.today()
    name = f"{prefix}-{date.isoformat()}"
    url = resolve_url(storage)
    if out is not None:
        destination.requested(out)  # an empty --out is refused, not read as the working directory
    out = Path(out) if out is not None else Path("sweeps") / prefix
    started = time.time()

    with series_lock(url, prefix, wait=wait):
        store = open_storage(url)
        sweeps = series_studies(store, prefix)
        previous = _latest([s for s in sweeps if s.date < date])
        champion = _champion(sweeps)
        warm: dict[str, Any] = {"from": None, "trials": 0, "space_changed": []}
        if name not in {s.name for s in sweeps}:
            enqueue = []
            if previous is not None:
                warm["from"] = previous.name
                warm["space_changed"] = space_changes(previous.space, parsed)
                enqueue = warm_start_trials(previous, parsed, parsed.sweep.warm_start)
                warm["trials"] = len(enqueue)
                _log_warm_start(previous.name, warm["space_changed"], len(enqueue))
            create_study(space, name=name, storage=url, enqueue=enqueue)
        else:
            logger.info("resuming sweep %s", name)
            create_study(space, name=name, storage=url, load_if_exists=True)
        _check_export_place(name, url, out / name)

        progress = run_study(
            name, storage=url, backend=backend, address=address, jobs=jobs, on_progress=on_progress
        )
        study = optuna.load_study(study_name=name, storage=store)
        summary = _summarise(
            study, parsed, previous=previous, champion=champion, warm=warm, run=progress, url=url
        )
        summary["duration_s"] = round(time.time() - started, 1)
        summary["stop_reason"] = progress.stop_reason
        error = None
        if summary["promoted"]:
            try:
                summary["champion"]["export"] = _promote(name, study, url, out, parsed)
            except TunerError as e:
                error = str(e)
                summary["promoted"] = False
                summary["promotion_error"] = error
                summary["champion"] = champion
        study.set_user_attr(SWEEP_ATTR, summary)
        _write_summary(out, name, summary)
    if error is not None:
        raise ExportFailed(f"sweep {name} ran, but its best could not be exported: {error}")
    # Written first, then raised: cron's mail (and its exit status) says the night went wrong.
    if progress.stop_reason:
        raise RunFailed(f"sweep {name}: {progress.stop_reason}")
    if progress.finished and progress.failed == progress.finished:
        raise RunFailed(f"sweep {name}: all {progress.finished} trials of its run failed")
    return summary


def submit_sweep(
    space: str | Path,
    *,
    address: str,
    prefix: str | None = None,
    storage: str | None = None,
    date: dt.date | None = None,
    wait: bool = False,
    out: str | Path | None = None,
    working_dir: str | Path = ".",
    requirements: str | Path | None = None,
) -> Submitted:
    """One sweep of the series as a Ray job at `address` (the dashboard's http://HEAD:8265),
    for a driver off the cluster. The whole `tuner sweep run` is the job, so the series lock,
    the promotion and the summary happen on the cluster, beside the trials. The space and the
    series name are checked here, before anything is uploaded; the store is not opened here (it
    may be reachable from the cluster only)."""
    parsed = load_space(space)
    if out is not None:
        destination.requested(out)  # an empty --out is refused here, not on the cluster
    working_dir = Path(working_dir).resolve()
    prefix = _series(prefix, parsed, str(space))
    # Named by the submitter's day, not the cluster's clock: the same study whoever runs it.
    date = date or dt.date.today()
    command = ["sweep", "run", "--space", _space_in(space, working_dir), "--name", prefix]
    command += ["--backend", "ray", "--date", date.isoformat()]
    command += ["--wait"] if wait else []
    command += ["--out", str(out)] if out is not None else []
    job = backends.submit_job(
        command,
        address=address,
        storage=resolve_url(storage),
        working_dir=working_dir,
        requirements=requirements,
        metadata={"tuner_sweep": f"{prefix}-{date.isoformat()}"},
    )
    if out is None or not Path(out).is_absolute():
        logger.warning(
            "the sweep's summaries and champion exports go to %s in the job's working directory "
            "on the cluster, which Ray deletes later: pass --out with an absolute path there",
            out or f"sweeps/{prefix}",
        )
    return job


def _series(prefix: str | None, space: Space, display: str) -> str:
    """The series' name: `--name`, else the space's (an empty --name is refused, not taken for
    no name)."""
    if prefix is not None:
        return check_series(prefix, key="--name")
    return check_series(space.name, key=f"{display}: name")


def _space_in(space: str | Path, working_dir: Path) -> str:
    """The space as the job finds it: a file here travels inside the working directory, so it
    is named relative to it; a packaged name is left as it is."""
    path = Path(space).expanduser()
    if not path.exists():
        return str(space)  # a packaged space (load_space found it): the cluster's tuner has it
    try:
        return path.resolve().relative_to(working_dir).as_posix()
    except ValueError:
        raise TunerError(
            f"--space {space} is outside --working-dir {working_dir}: the job sees only that "
            "folder, uploaded; move the space into it or pass another --working-dir"
        ) from None


# ----------------------------------------------------------------------------- the series


class SeriesStudy:
    """A study of a series, as read from the store."""

    def __init__(self, store: Any, name: str, date: dt.date, attrs: dict[str, Any]) -> None:
        self.store = store
        self.name = name
        self.date = date
        self.attrs = attrs

    @property
    def space(self) -> Space | None:
        stored = self.attrs.get(attrs.SPACE)
        return from_stored(stored) if stored else None

    @property
    def summary(self) -> dict[str, Any] | None:
        return self.attrs.get(SWEEP_ATTR)

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=self.store)


def series_studies(store: Any, prefix: str | None = None) -> list[SeriesStudy]:
    """The sweeps in the store (of one series, or all), oldest first."""
    found = []
    for frozen in store.get_all_studies():
        match = _SERIES.match(frozen.study_name)
        if match is None or (prefix is not None and match["prefix"] != prefix):
            continue
        try:
            date = dt.date.fromisoformat(match["date"])
        except ValueError:
            continue
        found.append(SeriesStudy(store, frozen.study_name, date, frozen.user_attrs))
    return sorted(found, key=lambda s: (s.date, s.name))


def _latest(studies: list[SeriesStudy]) -> SeriesStudy | None:
    return studies[-1] if studies else None


def _champion(sweeps: list[SeriesStudy]) -> dict[str, Any] | None:
    """The champion as the latest finished sweep recorded it."""
    for s in reversed(sweeps):
        if s.summary is not None:
            return s.summary.get("champion")
    return None


def space_changes(old: Space | None, new: Space) -> list[str]:
    """What differs between two spaces, as short phrases (empty: the same space)."""
    if old is None:
        return ["the previous sweep has no stored space"]
    a, b = old.to_stored(), new.to_stored()
    changes = []
    for key in ("params", "fixed"):
        added = sorted(set(b[key]) - set(a[key]))
        removed = sorted(set(a[key]) - set(b[key]))
        changed = sorted(k for k in set(a[key]) & set(b[key]) if a[key][k] != b[key][k])
        changes += [f"{key} added: {', '.join(added)}"] if added else []
        changes += [f"{key} removed: {', '.join(removed)}"] if removed else []
        changes += [f"{key} changed: {', '.join(changed)}"] if changed else []
    changes += [
        key
        for key in sorted(set(a) | set(b))
        if key not in ("params", "fixed", "name") and a.get(key) != b.get(key)
    ]
    return changes


def warm_start_trials(
    previous: SeriesStudy, space: Space, k: int
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The previous sweep's best `k` distinct params that fit `space`, best first, as
    (resolved values, user attrs) to enqueue. The baseline's params are left out: the baseline
    runs anyway."""
    if k == 0:
        return []
    study = previous.study()
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and t.value == t.value
    ]
    complete.sort(key=lambda t: rank_key(t.value, study.direction))
    skip = [space.baseline_values()] if space.baseline is not None else []
    picked: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for t in complete:
        values = {
            n: v for n, v in t.user_attrs.get(attrs.HPARAMS, t.params).items() if n in space.params
        }
        if values in skip or space.misfit(values) is not None:
            continue
        skip.append(values)
        picked.append((values, {WARM_START_ATTR: f"{previous.name}#{t.number}"}))
        if len(picked) == k:
            break
    return picked


def _log_warm_start(previous: str, changes: list[str], n: int) -> None:
    if changes:
        logger.warning(
            "the space changed since %s (%s); warm start takes %d of its best trials that fit",
            previous,
            "; ".join(changes),
            n,
        )
    else:
        logger.info("warm start: %d best trials of %s enqueued first", n, previous)


# ----------------------------------------------------------------------------- the end of a sweep


def _summarise(
    study: optuna.Study,
    space: Space,
    *,
    previous: SeriesStudy | None,
    champion: dict[str, Any] | None,
    warm: dict[str, Any],
    run: Progress,
    url: str,
) -> dict[str, Any]:
    best = best_trial(study)
    counts = state_counts(study)
    direction = study.direction
    finished = _done(study)
    gpu_hours = gpu_hours_held(study, space.resources.gpus_per_trial)
    summary: dict[str, Any] = {
        "series": study.study_name.rsplit("-", 3)[0],
        "study": study.study_name,
        "storage": mask_url(url),
        "metric": space.objective.metric,
        "direction": direction.name.lower(),
        "trials": counts,
        "this_run": {"complete": run.complete, "pruned": run.pruned, "failed": run.failed},
        "gpu_hours": round(gpu_hours, 6),
        "stopped_by": _stopped_by(space, finished, gpu_hours),
        "warm_start": warm,
        "best": None,
        "previous": None,
        "change": None,
        "baseline": None,
        "champion": champion,
        "promoted": False,
        "reason": "",
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if best is not None:
        summary["best"] = {
            "trial": best.number,
            "value": best.value,
            "params": best.user_attrs.get(attrs.HPARAMS, best.params),
            "warm_start": best.user_attrs.get(WARM_START_ATTR),
        }
    if previous is not None:
        prev_best = (previous.summary or {}).get("best") or {}
        summary["previous"] = {"study": previous.name, "best": prev_best.get("value")}
        if best is not None and prev_best.get("value") is not None:
            summary["change"] = best.value - prev_best["value"]
    base = baseline_trial(study)
    if base is not None and base.state == TrialState.COMPLETE and best is not None:
        summary["baseline"] = {
            "trial": base.number,
            "value": base.value,
            "improvement": gain(base.value, best.value, direction),
        }
    summary["promoted"], summary["reason"] = _decide(best, champion, study, space)
    if summary["promoted"]:
        summary["champion"] = {
            "study": study.study_name,
            "trial": best.number,
            "value": best.value,
            "since": study.study_name[-10:],  # the sweep's date
            "export": None,
        }
    return summary


def _stopped_by(space: Space, finished: int, gpu_hours: float) -> str:
    budget = space.budget
    if budget.n_trials is not None and finished >= budget.n_trials:
        return "n_trials"
    if budget.gpu_hours is not None and gpu_hours >= budget.gpu_hours:
        return "gpu_hours"
    if budget.timeout is not None:
        return "timeout"
    return "interrupted"


def _decide(
    best: FrozenTrial | None, champion: dict[str, Any] | None, study: optuna.Study, space: Space
) -> tuple[bool, str]:
    if best is None:
        return False, "no trial completed"
    if champion is None:
        return True, "the series' first champion"
    if champion["study"] == study.study_name and champion["trial"] == best.number:
        return False, "already the champion"
    margin = space.sweep.margin
    # Better by more than the margin: what the new best gains on the champion exceeds it.
    ahead = gain(champion["value"], best.value, study.direction)
    if ahead > margin:
        return True, f"better than the champion ({champion['study']}) by {ahead:.4g} > {margin:g}"
    return False, (
        f"not better than the champion ({champion['study']}, {champion['value']:.4g}) "
        f"by more than the margin {margin:g}"
    )


def _promote(name: str, study: optuna.Study, url: str, out: Path, space: Space) -> str | None:
    """Export today's best beside the earlier champions and point `OUT/champion` at it."""
    best = best_trial(study)
    assert best is not None
    if attrs.ADAPTER not in best.user_attrs:
        logger.info(
            "the %s workload leaves no adapter: champion recorded, nothing exported",
            space.fixed.get("workload", "sft"),
        )
        return None
    from tuner.core.export import export_trial

    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    export_trial(name, out=target, storage=url, force=True)
    link = out / "champion"
    tmp = out / f".champion.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)  # relative: the folder can move
    os.replace(tmp, link)  # atomic: a server reading `champion` sees the old or the new
    _prune_exports(out, keep=space.sweep.keep_exports, current=name)
    return str(target)


def _check_export_place(name: str, url: str, target: Path) -> None:
    """Before the run, not after it: a champion's export must be allowed where it would go
    (tuner.core.destination's rules; an earlier export of today's sweep is replaced)."""
    opened = open_study(name, url)
    keep, inside = destination.protected(opened, opened.space.fixed)
    target = destination.requested(target)
    destination.check(target, keep=keep, inside=inside, force=True, flag="--out")


def _prune_exports(out: Path, *, keep: int, current: str) -> None:
    """Remove this series' older champion exports beyond `keep`: folders named SERIES-DATE
    that hold an export. Nothing else in `--out` is touched: it may be a folder shared with
    other series, or with files that are not tuner's at all."""
    prefix = _SERIES.match(current)["prefix"]
    exports = sorted(
        p
        for p in out.iterdir()
        if p.is_dir()
        and not p.is_symlink()
        and (m := _SERIES.match(p.name)) is not None
        and m["prefix"] == prefix
        and (p / destination.PROVENANCE).is_file()
    )
    for old in exports[:-keep] if keep else exports:
        if old.name != current:
            logger.info("removing old champion export %s (sweep.keep_exports: %d)", old, keep)
            destination.remove(old)


def _write_summary(out: Path, name: str, summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in (
        (".json", json.dumps(summary, indent=2)),
        (".md", summary_markdown(summary)),
    ):
        path = out / f"{name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)


def summary_markdown(s: dict[str, Any]) -> str:
    from tuner.common.text import number

    t = s["trials"]
    lines = [
        f"# Sweep {s['study']}",
        "",
        f"- trials: {t.get('complete', 0)} complete, {t.get('pruned', 0)} pruned, "
        f"{t.get('fail', 0)} failed (stopped by {s['stopped_by']}); "
        f"{number(s['gpu_hours'])} GPU-hours",
    ]
    best = s.get("best")
    if best:
        lines.append(
            f"- best {s['metric']}: {number(best['value'])} (trial {best['trial']}"
            + (f", warm-started from {best['warm_start']}" if best.get("warm_start") else "")
            + ")"
        )
        lines += [f"  - `{k}` = {number(v)}" for k, v in best["params"].items()]
    if s.get("change") is not None:
        lines.append(f"- change from {s['previous']['study']}: {s['change']:+.4g}")
    if s.get("baseline"):
        lines.append(
            f"- better than the baseline (trial {s['baseline']['trial']}) by "
            f"{number(s['baseline']['improvement'])}"
        )
    warm = s["warm_start"]
    if warm.get("from"):
        lines.append(
            f"- warm start: {warm['trials']} trials from {warm['from']}"
            + (
                f"; space changed: {'; '.join(warm['space_changed'])}"
                if warm["space_changed"]
                else ""
            )
        )
    champion = s.get("champion")
    verdict = "promoted" if s["promoted"] else "kept"
    lines.append(f"- champion {verdict}: {s['reason'] or s.get('promotion_error', '')}")
    if champion:
        lines.append(
            f"  - {champion['study']} trial {champion['trial']}, "
            f"{number(champion['value'])}"
            + (f", exported to `{champion['export']}`" if champion.get("export") else "")
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- listing


def list_sweeps(prefix: str | None = None, storage: str | None = None) -> list[dict[str, Any]]:
    """Each sweep of the series (or of all series), oldest first, the current champion marked."""
    store = open_storage(storage, must_exist=True)  # a listing makes no store
    sweeps = series_studies(store, prefix)
    champions: dict[str, str | None] = {}
    by_series: dict[str, list[SeriesStudy]] = {}
    for s in sweeps:
        by_series.setdefault(_SERIES.match(s.name)["prefix"], []).append(s)
    for series, members in by_series.items():
        champion = _champion(members)
        champions[series] = champion["study"] if champion else None
    rows = []
    for s in sweeps:
        series = _SERIES.match(s.name)["prefix"]
        summary = s.summary or {}
        study = s.study()
        best = best_trial(study)
        rows.append(
            {
                "series": series,
                "date": s.date.isoformat(),
                "study": s.name,
                "trials": state_counts(study),
                "best": best.value if best else None,
                "change": summary.get("change"),
                "promoted": summary.get("promoted", False),
                "champion": champions[series] == s.name,
                "finished": bool(summary),
            }
        )
    return rows

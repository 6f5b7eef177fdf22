"""`tuner study report`: one self-contained HTML file about a study, to send to a colleague.

The plots are Optuna's own (`optuna.visualization`, plotly); plotly's JavaScript is embedded
once, so the file opens anywhere with no network. A plot that cannot be drawn yet (importances
with one finished trial, say) is replaced by the reason, not by an error.
"""

from __future__ import annotations

import html
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.common.errors import TunerError
from tuner.common.text import command
from tuner.common.text import number as _num
from tuner.core.study import TrialRow, baseline_trial, study_rows
from tuner.store import attrs, best_trial, gain, mask_url, open_study

logger = logging.getLogger(__name__)

# Params a LoRA reader looks at first; the slice plot shows these when the study searched them.
SLICE_FIRST = ("learning_rate", "lora_rank")


@dataclass
class Report:
    path: Path
    plots: int  # drawn
    skipped: dict[str, str]  # plot title -> why it was not drawn
    artifact_id: str | None  # the copy attached to the study, when attached


def write_report(
    name: str, *, out: str | Path, storage: str | None = None, attach: bool = True
) -> Report:
    """Write the report to `out` (atomically); with `attach`, also keep it as a study artifact."""
    opened = open_study(name, storage)
    study = opened.study
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    if not finished:
        raise TunerError(f"study {name!r} has no finished trial yet: nothing to report")

    sections, skipped = [], {}
    for title, draw in _plots(study):
        try:
            figure = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            skipped[title] = str(e).splitlines()[0] if str(e) else type(e).__name__
            sections.append(_section(title, f'<p class="skip">Not drawn: {_e(skipped[title])}</p>'))
            continue
        sections.append(_section(title, figure.to_html(full_html=False, include_plotlyjs=False)))

    document = _document(
        name=name,
        summary=_summary(name, opened, study),
        plots="\n".join(sections),
        table=_trial_table(study_rows(study)),
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
        url=mask_url(opened.url),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(document)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a file to share, not mkstemp's private 0600
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    artifact_id = None
    if attach:
        from optuna.artifacts import upload_artifact

        artifact_id = upload_artifact(
            artifact_store=opened.artifact_store(),
            file_path=str(out),
            study_or_trial=study,
            mimetype="text/html",
            encoding="utf-8",
        )
    drawn = len(sections) - len(skipped)
    logger.debug("report on %s: %d plots, %d not drawn", name, drawn, len(skipped))
    return Report(out, drawn, skipped, artifact_id)


def _plots(study: optuna.Study) -> list[tuple[str, Callable[[], Any]]]:
    import optuna.visualization as vis

    searched = sorted({p for t in study.get_trials(deepcopy=False) for p in t.params})
    slice_params = [p for p in SLICE_FIRST if p in searched] or searched or None
    return [
        ("Optimisation history", lambda: vis.plot_optimization_history(study)),
        ("Validation curves (pruned trials included)", lambda: vis.plot_intermediate_values(study)),
        ("Parameter importances", lambda: vis.plot_param_importances(study)),
        ("Parallel coordinates", lambda: vis.plot_parallel_coordinate(study)),
        ("Slices", lambda: vis.plot_slice(study, params=slice_params)),
        ("Timeline (what ran when)", lambda: vis.plot_timeline(study)),
    ]


def _summary(name: str, opened: Any, study: optuna.Study) -> str:
    counts: dict[str, int] = {}
    gpu_hours = 0.0
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        hours = t.user_attrs.get("gpu_hours")
        if isinstance(hours, int | float) and math.isfinite(hours):
            gpu_hours += hours
    space = opened.space
    items = [
        ("objective", f"{study.direction.name.lower()} {space.objective.metric}"),
        ("trials", ", ".join(f"{n} {state}" for state, n in counts.items())),
        ("GPU-hours", f"{gpu_hours:.3g}"),
    ]
    model = space.fixed.get("model_name_or_path")
    if model:
        items.append(("base model", str(model)))
    bits = space.fixed.get("quantization_bit")
    if bits:
        items.append(("QLoRA", f"trained on a {bits}-bit base; exports merge into the unquantised"))
    dataset = space.fixed.get("dataset")
    if isinstance(dataset, dict):
        items.append(("data set", str(dataset.get("path"))))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    parent = study.user_attrs.get(attrs.MLFLOW)
    if parent and parent.get("url"):
        rows += f"<tr><th>MLflow run</th><td>{_link(parent['url'])}</td></tr>"

    best = best_trial(study)
    if best is None:
        best_html = "<p>No trial has completed yet.</p>"
    else:
        params = best.user_attrs.get(attrs.HPARAMS, best.params)
        listed = "".join(
            f"<li><code>{_e(k)}</code> = {_e(_num(v))}</li>" for k, v in params.items()
        )
        best_html = (
            f"<p>Best: trial <b>{best.number}</b>, {_e(space.objective.metric)} "
            f"<b>{_e(_num(best.value))}</b>{_baseline_text(study, best)}</p><ul>{listed}</ul>"
            f"<p>Export it as a merged checkpoint that loads with plain transformers:</p>"
            f"<pre>{_e(command('tuner', 'study', 'export', name, '--out', f'{name}-best'))}</pre>"
        )
    return f"<table class='facts'>{rows}</table>{best_html}"


def _baseline_text(study: optuna.Study, best: Any) -> str:
    base = baseline_trial(study)
    if base is None or base.state != TrialState.COMPLETE or base.value is None:
        return ""
    margin = gain(base.value, best.value, study.direction)
    return (
        f"; the baseline (trial {base.number}) reached {_num(base.value)}, better by {_num(margin)}"
    )


def _trial_table(rows: list[TrialRow]) -> str:
    tracked = any(row.runs for row in rows)
    body = []
    for row in rows:
        cells = row.cells(facts=True)
        tds = "".join(f"<td>{_e(c)}</td>" for c in cells)
        if tracked:
            runs = "<br>".join(f"{_e(name)}: {_link(where)}" for name, where in row.runs.items())
            tds += f"<td>{runs}</td>"
        body.append(f"<tr class='{_e(row.state.lower())}'>{tds}</tr>")
    columns = TrialRow.columns(facts=True) + (["runs"] if tracked else [])
    ths = "".join(f"<th>{_e(h)}</th>" for h in columns)
    return (
        f"<table class='trials'><thead><tr>{ths}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{body}</section>"


def _document(*, name: str, summary: str, plots: str, table: str, generated: str, url: str) -> str:
    from plotly.offline import get_plotlyjs

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_e(name)}: tuner study report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; }}
table.facts th {{ background: #f4f4f4; }}
tr.pruned td {{ color: #888; }} tr.fail td {{ color: #b00; }}
.skip {{ color: #888; font-style: italic; }}
pre {{ background: #f4f4f4; padding: 0.5rem; }}
footer {{ color: #888; font-size: 0.8rem; margin-top: 2rem; }}
</style>
<script>{get_plotlyjs()}</script>
</head>
<body>
<h1>Study {_e(name)}</h1>
{summary}
{plots}
<section><h2>Trials</h2>{table}</section>
<footer>Generated by tuner on {_e(generated)} from {_e(url)}.</footer>
</body>
</html>
"""


def _link(where: str) -> str:
    """A run's page as a link; a folder or an MLflow `runs:/` name as text."""
    if where.startswith(("http://", "https://")):
        return f'<a href="{_e(where)}">{_e(where)}</a>'
    return f"<code>{_e(where)}</code>"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)

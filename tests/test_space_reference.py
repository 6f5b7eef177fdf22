"""The search-space reference: generated from the models' field descriptions, committed as
docs/space-reference.md, printed by `tuner spaces --fields`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trials.config import TrialConfig
from tuner.space import Space
from tuner.space.reference import (
    REGENERATE,
    documented_models,
    reachable_models,
    reference_markdown,
)

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "space-reference.md"


def test_committed_reference_is_what_the_models_generate():
    assert COMMITTED.read_text() == reference_markdown(), (
        f"docs/space-reference.md differs from the models' field descriptions; regenerate it: "
        f"`{REGENERATE}`"
    )


def test_every_key_a_space_file_can_hold_is_described():
    # TrialConfig is reached through `fixed`, a plain mapping validated against it.
    models = reachable_models(Space) | reachable_models(TrialConfig)
    assert models <= set(documented_models()), (
        f"not in tuner/space/reference.py's SECTIONS: "
        f"{sorted(m.__name__ for m in models - set(documented_models()))}"
    )
    undescribed = [
        f"{model.__name__}.{name}"
        for model in models
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert not undescribed, f"fields without a description: {undescribed}"
    text = reference_markdown()
    for model in models:
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{model.__name__}.{name} missing from the reference"


def test_spaces_fields_prints_the_reference():
    out = subprocess.run(
        [sys.executable, "-m", "tuner", "spaces", "--fields"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == COMMITTED.read_text()
    assert out.stderr == ""

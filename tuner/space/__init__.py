"""Search spaces: a YAML file → validated models → values suggested into an Optuna trial.

A space is plain data under a schema. Every error names the file, the key, what was wrong and
what is allowed, in one line, before anything touches a study store.

- `models`: what a space file means, as pydantic models (`Space`, the param kinds, the sections);
  their field descriptions are the space reference;
- `reading`: finding a file (`find_space_file`, the packaged spaces), safe YAML (`read_yaml`),
  data checked into a `Space` (`parse_space`), all three at once (`load_space`), a space a
  study stored read back (`from_stored`);
- `checks`: what the models alone cannot check: across sections (fixed keys, ranges against the
  trial's options, the baseline, the objective) and against the world (sampler and pruner,
  scorer, data, model, DeepSpeed, artifacts);
- `messages`: pydantic and YAML errors as one line;
- `reference`: the space reference (`tuner spaces --fields`), generated from the models.

Everything outside this package imports from `tuner.space`, the names below.
"""

from __future__ import annotations

from tuner.space.checks import ALIASES
from tuner.space.models import (
    LOSS_METRICS,
    PARAM_TYPES,
    Budget,
    CategoricalParam,
    FloatParam,
    Generation,
    IntParam,
    MultipleParam,
    ObjectiveSpec,
    Param,
    Resources,
    Scalar,
    Seconds,
    Space,
    SweepPolicy,
    parse_duration,
)
from tuner.space.reading import (
    MAX_SPACE_BYTES,
    MAX_VALUES,
    find_space_file,
    from_stored,
    load_space,
    packaged_spaces,
    packaged_spaces_dir,
    parse_space,
    read_yaml,
)

__all__ = [
    "ALIASES",
    "LOSS_METRICS",
    "MAX_SPACE_BYTES",
    "MAX_VALUES",
    "PARAM_TYPES",
    "Budget",
    "CategoricalParam",
    "FloatParam",
    "Generation",
    "IntParam",
    "MultipleParam",
    "ObjectiveSpec",
    "Param",
    "Resources",
    "Scalar",
    "Seconds",
    "Space",
    "SweepPolicy",
    "find_space_file",
    "from_stored",
    "load_space",
    "packaged_spaces",
    "packaged_spaces_dir",
    "parse_duration",
    "parse_space",
    "read_yaml",
]

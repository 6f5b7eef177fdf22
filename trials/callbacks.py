"""A trial's Trainer callbacks (trials/pruning.py, trials/speed.py) are plain classes that define
only the events they use, so importing them costs nothing: transformers takes seconds to import,
and a CLI that only reads a study never needs it. `trainer_callback` makes one a
`transformers.TrainerCallback` (which supplies every other event) when a Trainer is built."""

from __future__ import annotations

import functools
from typing import Any


def trainer_callback(cls: type, *args: Any, **kwargs: Any) -> Any:
    """`cls(*args, **kwargs)`, as a `transformers.TrainerCallback`."""
    return _with_trainer_events(cls)(*args, **kwargs)


@functools.cache
def _with_trainer_events(cls: type) -> type:
    from transformers import TrainerCallback

    # Named as `cls`: the Trainer tells callbacks apart by their class.
    return type(cls.__name__, (cls, TrainerCallback), {"__module__": cls.__module__})

"""The training stack a worker trains with: torch, transformers, peft, TRL and tuner's trial code,
imported once, quieted first.

`load()` is what a worker's warm-up calls (tuner.trial.objective). Importing this module calls it
too: it is the module the local backend's fork server preloads (tuner.backends.local), so that
each worker forked from it starts with the stack loaded rather than importing it again (6-7 s of
CPU a worker, most of what a short trial on a CPU costs).
"""

from __future__ import annotations

import contextlib


def load() -> None:
    from trials.quiet import quiet_libraries

    quiet_libraries()  # before the imports: DeepSpeed warns as it is imported
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from trials import sft  # noqa: F401


# Preloaded by a fork server, whose failure would stop every worker: a worker's own warm-up
# meets the error again, and says it as its trial's.
with contextlib.suppress(Exception):
    load()

"""Library noise off where tuner trains or exports, unless `TUNER_VERBOSITY` >= 1 (`tuner -v`).

The user reads tuner's own lines and its progress bar; the training stack's progress bars,
its deprecation notices (which only the libraries' authors can act on) and DeepSpeed's notice
that it found no GPU would drown them. Each library is quieted through its own switch, and
errors still come through: a failing trial says why in its own line.

One place, called by every process that loads the stack: a worker (tuner.trial.objective), the
export
(tuner.core.export) and the demo's pre-training (tuner.core.demo). Cheap to call again.
"""

from __future__ import annotations

import logging
import os
import warnings

# Deprecation notices raised inside the training stack (its own code calling its own deprecated
# API, e.g. peft's `is_gradient_checkpointing`): matched by the module they are attributed to, so
# one that tuner's or the user's code triggers still shows.
LIBRARIES = r"(transformers|peft|trl|accelerate|datasets|huggingface_hub|tokenizers)(\.|$)"


def verbosity() -> int:
    """`TUNER_VERBOSITY` as the CLI set it (-1 quiet, 0 default, 1+ verbose); 0 when unset."""
    try:
        return int(os.environ.get("TUNER_VERBOSITY", "0"))
    except ValueError:
        return 0


def quiet_libraries() -> None:
    """Silence the training stack's known noise in this process (see the module docstring)."""
    quiet = verbosity() < 1
    # DeepSpeed makes its logger at import (its level set, a handler of its own to stdout): a
    # filter set beforehand is what survives. Its `Setting accelerator to CPU` warning comes at
    # import on a machine without a GPU, and any of the imports below may import it. Whatever
    # the verbosity, what it says goes to the log (stderr), never to stdout, which `--json`
    # keeps for its one object.
    deepspeed = logging.getLogger("DeepSpeed")
    if _to_the_log not in deepspeed.filters:
        deepspeed.addFilter(_to_the_log)

    # Whatever the verbosity, the hub's and datasets' messages print once, not twice: each
    # library has a handler of its own and also hands the record on to the root logger.
    import datasets
    import huggingface_hub.utils.logging as hub_logging

    hub_logging.disable_propagation()
    datasets.logging.disable_propagation()
    if not quiet:
        return

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # bitsandbytes, imported by peft, warns on a CPU with AVX512-BF16 that an optional kernel
    # package (`kernels`, from the hub) is missing: its fallback works, and nothing is to do.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # `Loading weights`, `Writing model shards`; the hub's too
    hub_logging.set_verbosity_error()  # `Retrying in 1s [Retry 1/5]` while the hub is away
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)


def _to_the_log(record: logging.LogRecord) -> bool:
    """DeepSpeed's records through the root logger's handlers (the process's log, on stderr):
    errors always, the rest from `-v` on. False: DeepSpeed's own handler (stdout) gets none."""
    if record.levelno >= logging.ERROR or verbosity() >= 1:
        logging.getLogger().handle(record)
    return False

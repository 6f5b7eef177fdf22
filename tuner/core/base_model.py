"""Whether a space's base model can be loaded from here, asked once at `study create`.

Without this, a model that does not resolve fails every trial alike, after each has loaded its
libraries, and on an unreachable hub after minutes of retries per trial. The model is a local
folder, a hub id in the hub's cache, or (online) a hub id the hub has; its config and tokenizer
must load. The hub is asked once, with a short timeout and no retries, before anything is
downloaded; `HF_HUB_OFFLINE` is respected. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trials.config import TrialConfig
from tuner.common.text import error_line

HUB_TIMEOUT_S = 5.0  # one HEAD request; a hub that does not answer in this is unreachable


class ModelError(Exception):
    """The base model cannot be loaded from here; the message says why and what to do."""


def check(config: TrialConfig) -> Any:
    """Resolve `config.model_name_or_path` and load its config and tokenizer; returns the
    tokenizer. Raises ModelError in one line."""
    from huggingface_hub import constants

    model = str(config.model_name_or_path)
    if Path(model).is_dir():
        return _load(config, local_files_only=True)
    if _in_cache(model):
        try:
            return _load(config, local_files_only=True)
        except ModelError:
            if constants.HF_HUB_OFFLINE:
                raise
            # Partly cached (a config fetched alone, say): the hub has the rest.
    _find_on_hub(model)
    return _load(config, local_files_only=False)


def _in_cache(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except HFValidationError:
        raise ModelError(
            f"{model!r} is neither a model folder here nor a hub id (org/name)"
        ) from None


def _find_on_hub(model: str) -> None:
    """Make sure the hub has the model: one HEAD request, a short timeout, no retries. Raises
    ModelError when offline, unreachable, or the hub has no such model."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    download = (
        f"download it first where the hub is reachable (hf download {model}) and set "
        "HF_HUB_OFFLINE=1, or give a local model folder"
    )
    if constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"{model!r} is not a folder here nor in the hub cache ({constants.HF_HUB_CACHE}), "
            f"and HF_HUB_OFFLINE is set; download it first (hf download {model}) where the hub "
            "is reachable, or give a local model folder"
        )
    try:
        get_hf_file_metadata(hf_hub_url(model, "config.json"), timeout=_timeout())
    except GatedRepoError:
        raise ModelError(
            f"{model!r} is gated on the hub: accept its terms on its page, then log in "
            "(hf auth login, or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{model!r} is not a folder here, and the hub ({constants.ENDPOINT}) has no such "
            "model; check the id (a private one needs hf auth login, or HF_TOKEN)"
        ) from None
    except RemoteEntryNotFoundError:
        raise ModelError(
            f"{model!r} on the hub has no config.json: not a transformers model"
        ) from None
    except HfHubHTTPError as e:
        raise ModelError(
            f"the hub ({constants.ENDPOINT}) failed: {error_line(e)}; {download}"
        ) from None
    except Exception as e:  # noqa: BLE001 - the network's own errors (refused, timed out, DNS)
        raise ModelError(
            f"the hub ({constants.ENDPOINT}) is unreachable ({error_line(e)}), and {model!r} is "
            f"not a folder here nor in the hub cache; {download}"
        ) from None


def _timeout() -> float:
    # Longer only when the user asked the hub library for it (a slow link).
    return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_TIMEOUT_S)


def _load(config: TrialConfig, *, local_files_only: bool) -> Any:
    """Load the model's config and tokenizer (no weights): what every trial loads first."""
    from trials.quiet import quiet_libraries

    quiet_libraries()  # `study create` prints tuner's lines only, as a run does
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    model = config.model_name_or_path
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the error is the answer here, not a warning beside it
    try:
        for what, auto in (("config", AutoConfig), ("tokenizer", AutoTokenizer)):
            try:
                loaded = auto.from_pretrained(
                    model,
                    trust_remote_code=config.trust_remote_code,
                    local_files_only=local_files_only,
                )
            except Exception as e:  # noqa: BLE001 - any failure to load is the answer
                why = error_line(e)
                raise ModelError(f"the {what} of {model!r} does not load: {why}") from None
        return loaded
    finally:
        hf_logging.set_verbosity(verbosity)

"""Finding pretrained weights by name: a local directory, the Hugging Face cache, or the hub.

One rule for every pretrained model the package loads (the VLM backbone, the frozen text and image
encoders of ``vlm2rec-data features``): a directory is used as it is; a hub id is taken from the cache
without any network access; only when it is not cached is the hub tried, and only if allowed and
reachable (one TCP connect, which fails in milliseconds offline, where ``from_pretrained`` retries for
~30 s). Otherwise a :class:`CheckpointNotFoundError` says how to get the weights.

Ground-floor module: only ``errors`` of ours; transformers is imported when a name has to be looked up.
"""
from __future__ import annotations

import os
import socket
from typing import Dict, Tuple
from urllib.parse import urlparse

from recbole_vlm2rec.errors import ConfigError


class CheckpointNotFoundError(ConfigError, OSError):
    """A name that is no local directory and no cached or reachable hub checkpoint (an ``OSError`` like
    transformers' own; a ``ConfigError``, so that the commands print the message without a traceback)."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection (False at once with ``HF_HUB_OFFLINE=1``)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def missing_checkpoint_error(what: str, setting: str, name: str, reason: str, note: str = "") -> CheckpointNotFoundError:
    """The message for weights that cannot be found: ``what`` (e.g. "the VLM backbone") was named by
    ``setting`` (e.g. "vlm_name_or_path"), with how to download them and point ``setting`` at them."""
    local = f"/path/to/{name.split('/')[-1]}"
    return CheckpointNotFoundError(
        f"Cannot load {what} {setting}={name!r}: {reason}.\n"
        f"On a machine with internet access run\n"
        f"    huggingface-cli download {name} --local-dir {local}\n"
        f"(or `hf download ...`), copy that directory here and set {setting} to {local}." + (f"\n{note}" if note else "")
    )


def locate_checkpoint(name: str, what: str, setting: str, allow_download: bool = True,
                      note: str = "") -> Tuple[str, Dict[str, bool]]:
    """``(source, hub kwargs)`` for ``from_pretrained``, or a :class:`CheckpointNotFoundError` saying what to do.

    ``allow_download=False`` never contacts the hub (the weights must be a directory or already cached)."""
    if os.path.isdir(name):
        return name, {}
    expanded = os.path.expanduser(name)
    if name.startswith((".", "/", "~")) or os.path.isabs(expanded) or name.count("/") > 1:
        raise missing_checkpoint_error(what, setting, name, f"the directory {os.path.abspath(expanded)} does not exist",
                                       note)
    from huggingface_hub import snapshot_download

    try:  # already in the Hugging Face cache: no network needed
        snapshot_download(name, local_files_only=True)
        return name, {"local_files_only": True}
    except Exception:
        pass
    if not allow_download:
        raise missing_checkpoint_error(what, setting, name, "it is not a local directory and not in the Hugging Face "
                                       "cache (downloads are off)", note)
    if not hub_reachable():
        raise missing_checkpoint_error(what, setting, name, "it is not a local directory, not in the Hugging Face "
                                       "cache, and the hub cannot be reached", note)
    return name, {}

"""Loading a backbone by name: a built-in random one (``tiny.py``), a local directory, or a hub id.

A hub id that is neither cached nor reachable fails fast (one TCP connect instead of from_pretrained's
retries) with a message saying how to get the weights: a :class:`BackboneNotFoundError`, which the commands
report without a traceback. Kept apart from ``backbone.py`` so that ``tiny.py`` can build on ``backbone.py``
without an import cycle.
"""
from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

from recbole_vlm2rec.errors import ConfigError

from .backbone import _FAMILY_CLASSES, FAMILIES, Backbone, VLMProcessor, family_classes, resolve_dtype
from .tiny import BUILTIN_BACKBONES, build_tiny_backbone

logger = logging.getLogger(__name__)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint: fails in milliseconds offline, where from_pretrained retries ~30 s."""
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


class BackboneNotFoundError(ConfigError, OSError):
    """``vlm_name_or_path`` names no local directory and no reachable hub checkpoint (an ``OSError`` like
    transformers' own; a ``ConfigError``, so that ``run_recbole`` prints the message without a traceback)."""


def _missing_checkpoint_error(name: str, reason: str) -> BackboneNotFoundError:
    return BackboneNotFoundError(
        f"Cannot load the VLM backbone vlm_name_or_path={name!r}: {reason}.\n"
        f"On a machine with internet access run\n"
        f"    huggingface-cli download {name} --local-dir /path/to/{name.split('/')[-1]}\n"
        f"(or `hf download ...`), copy that directory here and set vlm_name_or_path: /path/to/{name.split('/')[-1]}.\n"
        f"Built-in offline backbones with random weights: {', '.join(BUILTIN_BACKBONES)}."
    )


def _locate(name: str):
    """Return (source, hub kwargs) for from_pretrained, or raise a message that says what to do."""
    if os.path.isdir(name):
        return name, {}
    expanded = os.path.expanduser(name)
    if name.startswith((".", "/", "~")) or os.path.isabs(expanded) or name.count("/") > 1:
        raise _missing_checkpoint_error(name, f"the directory {os.path.abspath(expanded)} does not exist")
    from transformers import AutoConfig

    try:  # already in the Hugging Face cache: no network needed
        AutoConfig.from_pretrained(name, local_files_only=True)
        return name, {"local_files_only": True}
    except Exception:
        pass
    if not _hub_reachable():
        raise _missing_checkpoint_error(
            name, "it is not a local directory, not in the Hugging Face cache, and the hub cannot be reached"
        )
    return name, {}


def load_backbone(cfg, device=None) -> Backbone:
    """Load the backbone named by ``cfg.vlm_name_or_path`` (an :class:`EncoderConfig`).

    Built-in names build a random model; anything else goes through ``from_pretrained``, a directory
    written by our ``save_pretrained`` included. ``device`` is where the weights go (default CPU).
    """
    from transformers import AutoConfig

    dtype = resolve_dtype(cfg.vlm_dtype, device)
    name = cfg.vlm_name_or_path
    if name in BUILTIN_BACKBONES:
        family, size = BUILTIN_BACKBONES[name]
        model, processor = build_tiny_backbone(
            family, cfg.tiny_seed, size=size, dtype=dtype, attn_implementation=cfg.attn_implementation, device=device
        )
        logger.info("Built the random backbone %s (%s, seed %d, %s).", name, family, cfg.tiny_seed, dtype)
        return Backbone(model=model, processor=processor, family=family, name_or_path=name)

    source, hub_kwargs = _locate(name)
    config = AutoConfig.from_pretrained(source, **hub_kwargs)
    # By config class: transformers 4.57 reports a loaded Qwen2-VL config's model_type as "qwen2_vl_text".
    by_class = {names[0]: family for family, names in _FAMILY_CLASSES.items()}
    family = by_class.get(type(config).__name__, getattr(config, "model_type", None))
    if family not in _FAMILY_CLASSES:
        raise ValueError(
            f"vlm_name_or_path={name!r} is a {family!r} model; supported families: {', '.join(FAMILIES)}"
        )
    model_cls = family_classes(family)[1]
    model = model_cls.from_pretrained(
        source, dtype=dtype, attn_implementation=cfg.attn_implementation, **hub_kwargs
    )
    if device is not None:
        model.to(device)
    model.eval()
    processor = VLMProcessor.from_pretrained(source, model.config, family, **hub_kwargs)
    logger.info("Loaded the VLM backbone %s (%s, %s, %s attention).", name, family, dtype, cfg.attn_implementation)
    return Backbone(model=model, processor=processor, family=family, name_or_path=name)

"""Loading a backbone by name: a built-in random one (``tiny.py``), a local directory, or a hub id.

A hub id that is neither cached nor reachable fails fast with a message saying how to get the weights
(``recbole_vlm2rec.hub``, the one rule for every pretrained model the package loads), which the commands
report without a traceback. Kept apart from ``backbone.py`` so that ``tiny.py`` can build on ``backbone.py``
without an import cycle.
"""
from __future__ import annotations

import logging

from recbole_vlm2rec.hub import locate_checkpoint

from .backbone import _FAMILY_CLASSES, FAMILIES, Backbone, VLMProcessor, family_classes, resolve_dtype
from .tiny import BUILTIN_BACKBONES, build_tiny_backbone

logger = logging.getLogger(__name__)


_BUILTIN_NOTE = f"Built-in offline backbones with random weights: {', '.join(BUILTIN_BACKBONES)}."


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

    source, hub_kwargs = locate_checkpoint(name, "the VLM backbone", "vlm_name_or_path", note=_BUILTIN_NOTE)
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

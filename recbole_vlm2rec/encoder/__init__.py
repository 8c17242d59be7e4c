"""VLM feature encoder: Qwen2-VL / Qwen2.5-VL / Qwen3-VL backbones with LoRA, prompts, last-token pooling,
frozen-vision cache and embedding export (DESIGN.md sections 2.1 and 2.4).

Where things are:

* ``config.py``       :class:`EncoderConfig`, the YAML keys
* ``backbone.py``     loading by hub id / directory / built-in name, dtype, attention, vision fingerprint
* ``tiny.py``         built-in random backbones (tiny ones for tests, real-size ones for benchmarks)
* ``inputs.py``       PIL image processing, image keys, tokenisation, image-token expansion, left padding, rotary positions
* ``prompts.py``      the prompt templates
* ``vision_cache.py`` the memory-mapped store of visual tokens
* ``lora.py``         LoRA / full / frozen set-up, adapter save and load
* ``encoder.py``      :class:`VLMEncoder` and :class:`ModalityEmbeddings`
* ``catalog.py``      catalog encoding (the loop; :meth:`VLMEncoder.encode_catalog` keeps the one cache)
* ``export.py``       the item-embedding files: ``.npy`` + ``.json`` export and import
* ``reference.py``    the plain transformers forward that tests and ``benchmarks/encoder_throughput.py`` compare with
"""
from .backbone import Backbone, VLMProcessor, load_backbone
from .config import EncoderConfig
from .encoder import ModalityEmbeddings, VLMEncoder
from .export import export_item_embeddings, load_item_embeddings
from .prompts import DEFAULT_TEMPLATES
from .tiny import BUILTIN_BACKBONES, build_tiny_backbone

__all__ = [
    "Backbone", "BUILTIN_BACKBONES", "DEFAULT_TEMPLATES", "EncoderConfig", "ModalityEmbeddings", "VLMEncoder",
    "VLMProcessor", "build_tiny_backbone", "export_item_embeddings", "load_backbone",
    "load_item_embeddings",
]

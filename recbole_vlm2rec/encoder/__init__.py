"""VLM feature encoder: Qwen2-VL / Qwen2.5-VL / Qwen3-VL backbones with LoRA, prompts, last-token pooling,
frozen-vision cache and embedding export (docs/design.md#encoder).

Where things are:

* ``config.py``       :class:`EncoderConfig`, the YAML keys
* ``backbone.py``     families, processor, dtype, image features, vision fingerprint
* ``loading.py``      loading by hub id / directory / built-in name (fails fast offline with how to get the weights)
* ``tiny.py``         built-in random backbones (tiny ones for tests, real-size ones for benchmarks)
* ``inputs.py``       PIL image processing, image keys, tokenisation, image-token expansion, left padding, rotary positions
* ``prompts.py``      the prompt templates
* ``vision_cache.py`` the memory-mapped store of visual tokens
* ``lora.py``         LoRA / full / frozen set-up, adapter save and load
* ``encoder.py``      :class:`VLMEncoder` and :class:`ModalityEmbeddings`
* ``catalog.py``      catalog encoding (the loop; :meth:`VLMEncoder.encode_catalog` keeps the one cache)
* the item-embedding files (``.npy`` + ``.json`` export and import) are ``recbole_vlm2rec.item_embeddings``,
  which reads them without this package; its two functions are re-exported here for compatibility
"""
from .backbone import Backbone, VLMProcessor
from .loading import load_backbone
from .config import EncoderConfig
from .encoder import ModalityEmbeddings, VLMEncoder
from recbole_vlm2rec.item_embeddings import export_item_embeddings, load_item_embeddings
from .prompts import DEFAULT_TEMPLATES
from .tiny import BUILTIN_BACKBONES, build_tiny_backbone

__all__ = [
    "Backbone", "BUILTIN_BACKBONES", "DEFAULT_TEMPLATES", "EncoderConfig", "ModalityEmbeddings", "VLMEncoder",
    "VLMProcessor", "build_tiny_backbone", "export_item_embeddings", "load_backbone",
    "load_item_embeddings",
]

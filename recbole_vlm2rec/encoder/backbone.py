"""Backbones: Qwen2-VL, Qwen2.5-VL and Qwen3-VL through transformers; dtype; the processor bundle; the
vision fingerprint. Loading by hub id, local directory or built-in name is ``loading.py``.

Everything family-specific that the encoder needs lives here (:class:`Backbone`): where the language
model and the vision tower are, how to get merged visual tokens out of ``get_image_features`` across
transformers versions, and the vision-settings fingerprint that keys the vision cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# family -> (config class, model class) names in transformers
_FAMILY_CLASSES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
}
FAMILIES = tuple(_FAMILY_CLASSES)
_FAMILY_ALIASES = {
    "qwen2-vl": "qwen2_vl", "qwen2vl": "qwen2_vl",
    "qwen2.5-vl": "qwen2_5_vl", "qwen2_5-vl": "qwen2_5_vl", "qwen2.5_vl": "qwen2_5_vl", "qwen25vl": "qwen2_5_vl",
    "qwen3-vl": "qwen3_vl", "qwen3vl": "qwen3_vl",
}
# Image normalisation of the released checkpoints, used when a directory has no preprocessor_config.json.
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def canonical_family(name: str) -> str:
    """'qwen2.5-vl', 'Qwen2_5_VL' ... -> 'qwen2_5_vl'."""
    key = str(name).lower()
    key = _FAMILY_ALIASES.get(key, key)
    if key not in _FAMILY_CLASSES:
        raise ValueError(f"unknown Qwen-VL family {name!r}; supported: {', '.join(FAMILIES)}")
    return key


def family_classes(family: str):
    """(config class, ForConditionalGeneration class) of a family, with a clear error on old transformers."""
    import transformers

    names = _FAMILY_CLASSES[canonical_family(family)]
    try:
        return tuple(getattr(transformers, n) for n in names)
    except AttributeError as err:
        raise ImportError(
            f"transformers {transformers.__version__} has no {names[1]}; Qwen2-VL, Qwen2.5-VL and Qwen3-VL need "
            "transformers>=4.57 (pip install -U 'transformers>=4.57')"
        ) from err


def default_image_stats(family: str):
    """(mean, std) of the family's released image processor."""
    if canonical_family(family) == "qwen3_vl":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return _OPENAI_CLIP_MEAN, _OPENAI_CLIP_STD


def resolve_dtype(name: str, device=None) -> torch.dtype:
    """'auto' -> bf16 on a GPU that supports it, fp32 otherwise (bf16 matmuls are slow on CPUs)."""
    if name == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


@dataclass
class VLMProcessor:
    """Tokenizer plus the image settings of a backbone (what ``AutoProcessor`` would be, minus torchvision).

    Patch, temporal-patch and merge sizes come from the model config (they define the vision tower);
    mean and std from ``preprocessor_config.json`` (they are part of how the checkpoint was trained).
    """

    tokenizer: object
    image_mean: tuple = _OPENAI_CLIP_MEAN
    image_std: tuple = _OPENAI_CLIP_STD
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2

    def save_pretrained(self, directory: str) -> None:
        """Write the tokenizer and a ``preprocessor_config.json`` that transformers' own processor reads too."""
        self.tokenizer.save_pretrained(directory)
        factor = self.patch_size * self.merge_size
        config = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "rescale_factor": 1 / 255,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "min_pixels": factor * factor, "max_pixels": factor * factor * 1280,
        }
        with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def from_pretrained(cls, source: str, model_config, family: str, **hub_kwargs) -> "VLMProcessor":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
        mean, std = default_image_stats(family)
        pre = _read_json(source, "preprocessor_config.json", **hub_kwargs)
        vision = model_config.vision_config
        return cls(
            tokenizer=tokenizer,
            image_mean=tuple(pre.get("image_mean", mean)), image_std=tuple(pre.get("image_std", std)),
            patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
        )


@dataclass
class Backbone:
    """A loaded VLM: the ``...ForConditionalGeneration`` model, its processor, family and source name."""

    model: torch.nn.Module
    processor: VLMProcessor
    family: str
    name_or_path: str


def _read_json(source: str, filename: str, **hub_kwargs) -> dict:
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        if not os.path.exists(path):
            return {}
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(source, filename, **hub_kwargs)
        except Exception:  # optional file: a checkpoint without it uses the family defaults
            return {}
    with open(path) as f:
        return json.load(f)


def image_features(base_model, family: str, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    """Merged visual tokens of a batch of images: ``(tokens [N*T, D], deepstack [K x [N*T, D]])``.

    ``base_model`` is the inner ``...Model`` (with ``.visual`` and ``.language_model``). transformers 5
    returns an output object with ``pooler_output`` (a tensor or one tensor per image) and, for Qwen3-VL,
    ``deepstack_features``; 4.x returns a tensor, a tuple of per-image tensors, or for Qwen3-VL a pair
    ``(tokens, deepstack)``. Deepstack is an empty list for the families without it.
    """
    out = base_model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw)
    deepstack = None
    if hasattr(out, "pooler_output"):
        tokens = out.pooler_output
        deepstack = getattr(out, "deepstack_features", None)
    elif family == "qwen3_vl" and isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], (list, tuple)):
        tokens, deepstack = out
    else:
        tokens = out
    tokens = _cat(tokens)
    deepstack = [_cat(d) for d in deepstack] if deepstack else []
    return tokens, deepstack


def _cat(x):
    return torch.cat(list(x), dim=0) if isinstance(x, (list, tuple)) else x


def vision_fingerprint(base_model, processor: VLMProcessor, image_size: int, family: str) -> str:
    """Hash of everything that determines an image's merged visual tokens.

    Vision config, image settings and size, the tower's compute dtype, and its weights (names, shapes and
    a strided sample of up to 1024 exact values per tensor: reading all 600 M values would take seconds,
    and any fine-tuning or other checkpoint changes the sample).
    """
    visual = base_model.visual
    h = hashlib.sha256()
    vcfg = {k: v for k, v in visual.config.to_dict().items()
            if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype", "architectures",
                                                    "name_or_path", "output_hidden_states", "return_dict")}
    settings = dict(family=family, vision=vcfg, image_size=image_size, mean=list(processor.image_mean),
                    std=list(processor.image_std), patch=processor.patch_size, tpatch=processor.temporal_patch_size,
                    merge=processor.merge_size)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(visual.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 1024)
            sample = flat[::step][:1024].float().cpu().numpy()
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(sample.tobytes())
    return h.hexdigest()

"""`EncoderConfig`: every setting of the VLM encoder, read from the flat YAML/RecBole config.

The field names are YAML keys (see ``properties/model/VLM2Rec.yaml``). Defaults are meant for a real
checkpoint on a GPU (the paper's Qwen2.5-VL-3B with LoRA); tests and the offline demo switch to a
built-in tiny backbone with ``vlm_name_or_path: tiny-qwen2-vl``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

DTYPES = ("auto", "bf16", "fp16", "fp32")
# Accepted spellings for the same dtypes, so that "bfloat16" from a config written for
# transformers does not fail with a surprising error.
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
FINETUNE_MODES = ("lora", "full", "frozen")
# fp32 exists so that the cached path can be checked bit for bit against the uncached one on an fp32
# model; on a bf16 model bf16 storage is lossless, which is why it is the default.
CACHE_DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class EncoderConfig:
    """Settings of :class:`~recbole_vlm2rec.encoder.VLMEncoder`.

    Build it with ``EncoderConfig.from_dict(config_dict)``: unrelated keys are ignored, wrong types or
    values raise ``ValueError`` naming the key.
    """

    #: Hub id ("Qwen/Qwen2.5-VL-3B-Instruct"), local directory, or a built-in random backbone
    #: ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"; see ``encoder.tiny``).
    vlm_name_or_path: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    #: auto = bf16 on a GPU that supports it, fp32 otherwise.
    vlm_dtype: str = "auto"
    attn_implementation: str = "sdpa"
    #: Recompute activations in the backward pass (only active while training).
    gradient_checkpointing: bool = True
    #: lora = LoRA adapters on the language model; full = train all language-model weights; frozen = no training.
    finetune: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    #: Names of the language model's linear layers that get adapters.
    lora_target_modules: list = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    #: Also train the vision tower (LoRA on its linear layers, or fully with finetune=full). Turns the vision cache off.
    train_vision_tower: bool = False
    #: Images are resized to image_size x image_size; must be a multiple of patch_size * merge_size (28 for Qwen2/2.5-VL, 32 for Qwen3-VL).
    image_size: int = 224
    #: Each item's text (in item prompts and in each history entry) is cut to this many tokens.
    max_text_tokens: int = 128
    #: Overrides of the named prompt templates (see ``encoder.prompts.DEFAULT_TEMPLATES``).
    prompt_templates: dict = field(default_factory=dict)
    #: A batch of prompts runs as at most this many forwards, rows grouped by length so that little padding is
    #: computed (``encoder/buckets.py``); 1 = one left-padded forward per batch.
    length_buckets: int = 4
    #: Compute each image's visual tokens once and reuse them (only while the vision tower is frozen).
    vision_cache: bool = True
    #: Where the vision cache lives; None = under the directory the caller passes at runtime.
    vision_cache_dir: Optional[str] = None
    vision_cache_dtype: str = "bf16"
    #: Seed of the built-in random backbones.
    tiny_seed: int = 0

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EncoderConfig":
        """Build from a flat mapping of YAML keys (a RecBole ``Config.final_config_dict``, say).

        Keys that are not fields are ignored; a key whose value is None keeps the default, except
        ``vision_cache_dir`` where None is a value.
        """
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            if value is None and f.name != "vision_cache_dir":
                continue
            kwargs[f.name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Normalise spellings and check every field; raises ``ValueError`` naming the key."""
        _check_type("vlm_name_or_path", self.vlm_name_or_path, str)
        if not self.vlm_name_or_path.strip():
            raise ValueError("EncoderConfig: 'vlm_name_or_path' is empty; give a hub id, a local directory or 'tiny-qwen2-vl'")
        self.vlm_dtype = DTYPE_ALIASES.get(str(self.vlm_dtype).lower(), str(self.vlm_dtype).lower())
        _check_choice("vlm_dtype", self.vlm_dtype, DTYPES)
        _check_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _check_type("gradient_checkpointing", self.gradient_checkpointing, bool)
        _check_choice("finetune", self.finetune, FINETUNE_MODES)
        _check_type("lora_r", self.lora_r, int, positive=True)
        _check_type("lora_alpha", self.lora_alpha, (int, float), positive=True)
        _check_type("lora_dropout", self.lora_dropout, (int, float))
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"EncoderConfig: 'lora_dropout' must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.lora_target_modules, str):  # "q_proj,v_proj" from a command line
            self.lora_target_modules = [s.strip() for s in self.lora_target_modules.split(",") if s.strip()]
        if isinstance(self.lora_target_modules, tuple):
            self.lora_target_modules = list(self.lora_target_modules)
        _check_type("lora_target_modules", self.lora_target_modules, list)
        if not self.lora_target_modules or not all(isinstance(m, str) and m for m in self.lora_target_modules):
            raise ValueError(
                "EncoderConfig: 'lora_target_modules' must be a non-empty list of layer names such as "
                f"['q_proj', 'v_proj'], got {self.lora_target_modules!r}"
            )
        _check_type("train_vision_tower", self.train_vision_tower, bool)
        if self.train_vision_tower and self.finetune == "frozen":
            raise ValueError("EncoderConfig: 'train_vision_tower' is true but 'finetune' is 'frozen'; use finetune: lora or full")
        _check_type("image_size", self.image_size, int, positive=True)
        _check_type("max_text_tokens", self.max_text_tokens, int, positive=True)
        _check_type("prompt_templates", self.prompt_templates, dict)
        for name, template in self.prompt_templates.items():
            if not isinstance(template, str):
                raise ValueError(
                    f"EncoderConfig: 'prompt_templates.{name}' must be a string, got {type(template).__name__}"
                )
        _check_type("length_buckets", self.length_buckets, int, positive=True)
        _check_type("vision_cache", self.vision_cache, bool)
        if self.vision_cache_dir is not None:
            _check_type("vision_cache_dir", self.vision_cache_dir, str)
        self.vision_cache_dtype = DTYPE_ALIASES.get(str(self.vision_cache_dtype).lower(), str(self.vision_cache_dtype).lower())
        _check_choice("vision_cache_dtype", self.vision_cache_dtype, CACHE_DTYPES)
        _check_type("tiny_seed", self.tiny_seed, int)

    @property
    def vision_trainable(self) -> bool:
        """True when the vision tower receives gradients (then its output cannot be cached)."""
        return self.train_vision_tower and self.finetune != "frozen"


def _check_type(key, value, types, positive=False):
    types = types if isinstance(types, tuple) else (types,)
    # bool is an int subclass: "lora_r: true" must not pass as 1.
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise ValueError(f"EncoderConfig: '{key}' must be {names}, got {value!r} ({type(value).__name__})")
    if positive and value <= 0:
        raise ValueError(f"EncoderConfig: '{key}' must be positive, got {value!r}")


def _check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"EncoderConfig: '{key}' must be one of {', '.join(choices)}; got {value!r}")

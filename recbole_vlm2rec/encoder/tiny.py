"""Built-in randomly initialised Qwen-VL backbones: tiny ones for tests and the offline demo, real-size
ones for throughput measurements.

No model hub is reachable here, so a backbone is built from a config with random weights (deterministic
by seed) and an offline byte-level BPE tokenizer trained on a fixed corpus that carries the Qwen special
tokens (``<|vision_start|>``, ``<|image_pad|>`` ...). The model config's token ids point at that
tokenizer's ids, so prompts, image-token expansion and the model agree exactly as with a real checkpoint.
A built backbone can be written with ``save_pretrained`` and loaded again by path through the same code
path as a downloaded checkpoint (``encoder.loading.load_backbone``).

Names usable as ``vlm_name_or_path``:

* ``tiny-qwen2-vl``, ``tiny-qwen2.5-vl``, ``tiny-qwen3-vl``: 2 layers, hidden 64, vision depth 2;
  a forward costs about a millisecond per item on one CPU thread.
* ``random-qwen2-vl-2b``, ``random-qwen2.5-vl-3b``: the layer shapes of Qwen2-VL-2B and Qwen2.5-VL-3B
  (vocabulary of 151,936 kept for the embedding's size), for GPU throughput runs only.
"""
from __future__ import annotations

import functools

import torch

from .backbone import VLMProcessor, canonical_family, default_image_stats, family_classes, transformers_major

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
TINY_VOCAB_SIZE = 1024

# A fixed corpus of catalog-like words and the prompt wording, so that the tiny tokenizer splits typical
# item text into a realistic number of tokens (about one per short word).
_CORPUS = """
Item: Summarize the above item in one word. Summarize the above image in one word.
A user bought these items, in order. Summarize the user's next item in one word.
History: user item image title brand category categories description feature price color colour size
Beauty Skin Care Face Body Hair Makeup Nail Fragrance Tools Accessories Bath Shower Lotion Cream Serum
Shampoo Conditioner Lipstick Mascara Eyeliner Foundation Powder Brush Sponge Mirror Perfume Cologne Oil
Sports Outdoors Fitness Running Cycling Camping Hiking Yoga Ball Bottle Bag Shoe Shirt Jacket Glove Hat
Toys Games Puzzle Doll Figure Block Card Board Game Kids Baby Plush Car Train Robot Kit Set Pack
Clothing Shoes Jewelry Women Men Girls Boys Dress Skirt Pants Jeans Shorts Sweater Hoodie Coat Sock Ring
red orange yellow green blue purple pink brown black white gray grey silver gold navy teal beige
small medium large extra soft hard light dark bright matte glossy natural organic vegan waterproof
circle square triangle star stripe dot striped dotted checked plain pattern texture noise shape
the a an and or of for with in on to by from new best top premium classic original professional
one two three four five six seven eight nine ten pack count ounce oz ml inch cm piece pieces
"""


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the tiny byte-level BPE once per process (deterministic: fixed corpus, fixed settings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact, which text truncation by tokens relies on.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [ln for ln in _CORPUS.strip().splitlines() if ln.strip()]
    # Repeating lower-case and title-case variants makes whole words frequent enough to become tokens.
    corpus = lines + [ln.lower() for ln in lines] + [ln.title() for ln in lines]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer():
    """An offline Qwen-style fast tokenizer (byte-level BPE, Qwen special tokens, no BOS)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        padding_side="left",
        model_max_length=32768,
    )
    return tokenizer


def _token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _rope(theta, section):
    return {"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)}


_TINY_QWEN2_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=32, rope_parameters=_rope(1e6, (4, 6, 6)))

# Layer shapes of each built-in backbone. Tiny ones keep the real families' structure (patch sizes,
# merge size, window attention, deepstack) at toy width; the real-size ones copy the published configs.
_SHAPES = {
    ("qwen2_vl", "tiny"): dict(
        text=_TINY_QWEN2_TEXT,
        vision=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
    ),
    ("qwen2_5_vl", "tiny"): dict(
        text=_TINY_QWEN2_TEXT,
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
    ),
    ("qwen3_vl", "tiny"): dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32,
                  rope_parameters={**_rope(5e6, (6, 5, 5)), "mrope_interleaved": True}),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0]),
    ),
    ("qwen2_vl", "2b"): dict(
        text=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, rope_parameters=_rope(1e6, (16, 24, 24))),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
    ),
    ("qwen2_5_vl", "3b"): dict(
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2, rope_parameters=_rope(1e6, (16, 24, 24))),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31]),
    ),
}

#: vlm_name_or_path value -> (family, size)
BUILTIN_BACKBONES = {
    "tiny-qwen2-vl": ("qwen2_vl", "tiny"),
    "tiny-qwen2.5-vl": ("qwen2_5_vl", "tiny"),
    "tiny-qwen3-vl": ("qwen3_vl", "tiny"),
    "random-qwen2-vl-2b": ("qwen2_vl", "2b"),
    "random-qwen2.5-vl-3b": ("qwen2_5_vl", "3b"),
}


def builtin_config(family: str, size: str, tokenizer=None):
    """The transformers config of a built-in backbone (token ids taken from the tiny tokenizer)."""

    if (family, size) not in _SHAPES:
        raise ValueError(f"no built-in backbone of family {family!r} and size {size!r}; known: {sorted(_SHAPES)}")
    tokenizer = tokenizer or build_tiny_tokenizer()
    shape = _SHAPES[(family, size)]
    ids = _token_ids(tokenizer)
    text = {"vocab_size": TINY_VOCAB_SIZE, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, **shape["text"]}
    if transformers_major() < 5:  # 4.x: rope_theta + rope_scaling instead of rope_parameters
        rope = dict(text.pop("rope_parameters"))
        text["rope_theta"] = rope.pop("rope_theta")
        kind = {"rope_type": "default"} if family == "qwen3_vl" else {"type": "mrope"}
        text["rope_scaling"] = {**kind, **{k: v for k, v in rope.items() if k != "rope_type"}}
    config_cls = family_classes(family)[0]
    config = config_cls(text_config=text, vision_config=dict(shape["vision"]), tie_word_embeddings=True, **ids)
    config.text_config.tie_word_embeddings = True
    return config


def build_tiny_backbone(family: str = "qwen2_vl", seed: int = 0, *, size: str = "tiny", dtype=torch.float32,
                        attn_implementation: str = "sdpa", device=None):
    """Build a randomly initialised backbone: ``(model, processor)``.

    ``model`` is the family's ``...ForConditionalGeneration`` (what ``from_pretrained`` of a real
    checkpoint returns), ``processor`` a :class:`~recbole_vlm2rec.encoder.backbone.VLMProcessor`
    (tokenizer + image settings). Same family and seed give the same weights; the global random state
    is left untouched.
    """

    family = canonical_family(family)
    tokenizer = build_tiny_tokenizer()
    config = builtin_config(family, size, tokenizer)
    model_cls = family_classes(family)[1]
    device = torch.device(device or "cpu")
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        # Real-size ones are built straight on the target device: initialising 2-3 B parameters on a CPU
        # thread takes minutes.
        with device:
            model = model_cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    mean, std = default_image_stats(family)
    vision = config.vision_config
    processor = VLMProcessor(
        tokenizer=tokenizer, image_mean=mean, image_std=std, patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size,
    )
    return model, processor

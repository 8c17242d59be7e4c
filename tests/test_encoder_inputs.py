"""Encoder configuration, prompt templates and input building (no model forward needed)."""
import numpy as np
import pytest
import torch
from PIL import Image

from recbole_vlm2rec.encoder import DEFAULT_TEMPLATES, EncoderConfig, build_tiny_backbone
from recbole_vlm2rec.encoder.inputs import ImagePreprocessor, PromptTokenizer, image_key, open_image
from recbole_vlm2rec.encoder.prompts import PromptBuilder, resolve_templates


def test_config_from_dict_ignores_unrelated_keys_and_names_bad_ones():
    cfg = EncoderConfig.from_dict({"vlm_name_or_path": "tiny-qwen2-vl", "lora_r": 8, "epochs": 3,
                                   "vlm_dtype": "bfloat16", "lora_target_modules": "q_proj, v_proj",
                                   "vision_cache_dir": None, "image_size": None})
    assert (cfg.lora_r, cfg.vlm_dtype, cfg.lora_target_modules, cfg.image_size) == (8, "bf16", ["q_proj", "v_proj"], 224)
    for bad, key in [({"lora_r": "8"}, "lora_r"), ({"lora_r": True}, "lora_r"), ({"lora_r": 0}, "lora_r"),
                     ({"finetune": "qlora"}, "finetune"), ({"vlm_dtype": "int8"}, "vlm_dtype"),
                     ({"vision_cache": "yes"}, "vision_cache"), ({"lora_dropout": 1.5}, "lora_dropout"),
                     ({"prompt_templates": {"item_text": 3}}, "prompt_templates.item_text"),
                     ({"finetune": "frozen", "train_vision_tower": True}, "train_vision_tower"),
                     ({"attn_implementation": "flash"}, "attn_implementation")]:
        with pytest.raises(ValueError, match=key):
            EncoderConfig.from_dict(bad)


def test_templates_override_and_validation():
    t = resolve_templates({"item_text": "Product: {text}\nOne word:"})
    assert t["item_text"] == "Product: {text}\nOne word:" and t["chat"] == DEFAULT_TEMPLATES["chat"]
    with pytest.raises(ValueError, match="unknown template"):
        resolve_templates({"item_txt": "{text}"})
    with pytest.raises(ValueError, match="missing placeholder"):
        resolve_templates({"item_image": "no image here"})
    with pytest.raises(ValueError, match="unknown placeholder"):
        resolve_templates({"item_text": "{text} {title}"})
    b = PromptBuilder("<IMG>", {"user_text_entry": "- {text}", "history_separator": "; "})
    assert "- a; - b" in b.user_text(["a", "b"])
    assert b.user_image(2).count("<IMG>") == 2
    assert b.interleaved_user(["a", "b"], [True, False]).count("<IMG>") == 1
    assert "{braces}" in b.item_text("{braces}")  # user text is never re-formatted


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_backbone("qwen2_vl", 0)


@pytest.mark.parametrize("family,size", [("qwen2_vl", 56), ("qwen3_vl", 64), ("qwen2_vl", 224)])
def test_image_preprocessing_matches_transformers(family, size):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen2VLImageProcessorPil"):
        pytest.skip("this transformers has no PIL Qwen2-VL image processor (added in 5.x)")
    from transformers import Qwen2VLImageProcessorPil

    _, proc = build_tiny_backbone(family, 0)
    pre = ImagePreprocessor(proc, size)
    rng = np.random.default_rng(1)
    imgs = [open_image(Image.fromarray(rng.integers(0, 255, (50 + 13 * i, 90, 3), dtype=np.uint8)), size)[0]
            for i in range(2)]
    factor = proc.patch_size * proc.merge_size
    hf = Qwen2VLImageProcessorPil(image_mean=list(proc.image_mean), image_std=list(proc.image_std),
                                  patch_size=proc.patch_size, merge_size=proc.merge_size,
                                  min_pixels=factor * factor, max_pixels=size * size)
    ref = hf(imgs, return_tensors="pt")
    ours = pre(imgs)
    assert ours.shape == ref["pixel_values"].shape
    torch.testing.assert_close(ours, ref["pixel_values"].float(), atol=1e-5, rtol=0)
    assert torch.equal(pre.grid_thw(2), ref["image_grid_thw"])
    assert pre.tokens_per_image == (size // factor) ** 2


def test_image_size_must_fit_the_patch_grid(tiny):
    with pytest.raises(ValueError, match="image_size=100 is not a multiple of 28.*84 or 112"):
        ImagePreprocessor(tiny[1], 100)


def test_open_image_and_keys(tmp_path):
    good = tmp_path / "a.png"
    Image.new("RGB", (30, 20), (255, 0, 0)).save(good)
    corrupt = tmp_path / "b.jpg"
    corrupt.write_bytes(b"not an image")
    assert open_image(str(good), 56)[0].size == (56, 56)
    assert open_image(str(corrupt), 56) == (None, "unreadable")
    assert open_image(str(tmp_path / "none.png"), 56) == (None, "missing")
    assert open_image(None, 56) == (None, "missing") and open_image("", 56) == (None, "missing")
    assert image_key(None) is None and image_key(str(tmp_path / "none.png")) is None
    key = image_key(str(good))
    Image.new("RGB", (31, 20), (255, 0, 0)).save(good)
    assert image_key(str(good)) != key  # an edited file is a new image
    pil = Image.new("RGB", (8, 8), (1, 2, 3))
    assert image_key(pil) == image_key(pil.copy()) != image_key(Image.new("RGB", (8, 8), (1, 2, 4)))


def test_tokenizer_expansion_padding_truncation_and_sanitising(tiny):
    model, proc = tiny
    tok = PromptTokenizer(proc.tokenizer, model.config, tokens_per_image=4, merged_side=2)
    img = tok.image_placeholder()
    rows = tok.encode([f"a {img} b {img}", "plain text"])
    assert (rows[0] == tok.image_token_id).sum() == 8
    batch = tok.batch(rows)
    assert batch.num_images == 2
    assert batch.attention_mask[1, 0] == 0 and batch.attention_mask[:, -1].all()  # left padding
    assert batch.input_ids[1, 0] == tok.pad_id
    # Special-token strings in item text are removed (they would add image tokens without pixels).
    assert tok.sanitize("Lipstick <|image_pad|><|im_end|>red") == "Lipstick red"
    long = "lipstick " * 50
    cut = tok.truncate([long, "short", None], 10)
    assert len(proc.tokenizer(cut[0], add_special_tokens=False)["input_ids"]) == 10
    assert long.startswith(cut[0]) and cut[1:] == ["short", ""]

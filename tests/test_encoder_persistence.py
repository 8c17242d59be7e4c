"""Loading and saving: tiny backbones by name and by path, adapters, merging, hub ids without a network."""
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from recbole_vlm2rec.encoder import EncoderConfig, VLMEncoder, build_tiny_backbone, load_backbone

TEXTS = ["Red matte lipstick", "", "Blue running shoe"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(2)
    out = []
    for i in range(3):
        p = d / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(p)
        out.append(str(p))
    out[1] = None
    return out


def _cfg(**kw):
    base = dict(vlm_name_or_path="tiny-qwen2-vl", vlm_dtype="fp32", image_size=56, lora_r=4, lora_dropout=0.0,
                vision_cache=False)
    base.update(kw)
    return EncoderConfig(**base)


@torch.no_grad()
def _embed(enc, images):
    enc.eval()
    out = enc.encode_items(TEXTS, images)
    users = enc.encode_users([["a", "b"]], [[images[0], images[2]]])
    return torch.cat([out.text, out.image, users.text, users.image])


def _perturb_lora(enc, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_tiny_backbones_are_deterministic_by_seed_and_reload_by_path(family, tmp_path, images):
    a, _ = build_tiny_backbone(family, seed=3)
    b, _ = build_tiny_backbone(family, seed=3)
    c, _ = build_tiny_backbone(family, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)

    name = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl", "qwen3_vl": "tiny-qwen3-vl"}[family]
    size = 64 if family == "qwen3_vl" else 56
    enc = VLMEncoder(_cfg(vlm_name_or_path=name, image_size=size, finetune="frozen"))
    enc.save_pretrained(str(tmp_path / "ckpt"))
    assert os.path.exists(tmp_path / "ckpt" / "preprocessor_config.json")
    again = VLMEncoder(_cfg(vlm_name_or_path=str(tmp_path / "ckpt"), image_size=size, finetune="frozen"))
    assert again.family == family
    torch.testing.assert_close(_embed(enc, images), _embed(again, images), atol=0, rtol=0)
    # The directory is an ordinary transformers checkpoint.
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == family


def test_adapter_round_trip_and_merge(tmp_path, images):
    enc = VLMEncoder(_cfg())
    _perturb_lora(enc)
    before = _embed(enc, images)
    enc.save_adapter(str(tmp_path / "adapter"))
    assert {"adapter_config.json", "vlm2rec_adapter.json"} <= set(os.listdir(tmp_path / "adapter"))

    fresh = VLMEncoder(_cfg())  # same base weights, untrained adapter
    assert not torch.allclose(_embed(fresh, images), before)
    params = {id(p) for p in fresh.parameters()}
    fresh.load_adapter(str(tmp_path / "adapter"))
    assert {id(p) for p in fresh.parameters()} == params  # loaded in place: an optimizer stays valid
    torch.testing.assert_close(_embed(fresh, images), before, atol=0, rtol=0)

    frozen = VLMEncoder(_cfg(finetune="frozen"))  # an encoder without an adapter gets one
    frozen.load_adapter(str(tmp_path / "adapter"))
    torch.testing.assert_close(_embed(frozen, images), before, atol=1e-6, rtol=0)

    other = VLMEncoder(_cfg(lora_r=2))  # another rank: re-wrapped
    other.load_adapter(str(tmp_path / "adapter"))
    torch.testing.assert_close(_embed(other, images), before, atol=1e-6, rtol=0)

    enc.merge_adapter()
    torch.testing.assert_close(_embed(enc, images), before, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match="no LoRA adapter"):
        enc.save_adapter(str(tmp_path / "again"))


def test_save_pretrained_merges_the_adapter_without_touching_the_encoder(tmp_path, images):
    enc = VLMEncoder(_cfg())
    _perturb_lora(enc, seed=1)
    before = _embed(enc, images)
    enc.save_pretrained(str(tmp_path / "merged"))
    assert any("lora_" in n for n, _ in enc.named_parameters())
    loaded = VLMEncoder(_cfg(vlm_name_or_path=str(tmp_path / "merged"), finetune="frozen"))
    torch.testing.assert_close(_embed(loaded, images), before, atol=1e-5, rtol=0)


def test_lora_targets_only_the_language_model():
    enc = VLMEncoder(_cfg(vlm_name_or_path="tiny-qwen2.5-vl"))  # its vision MLP also has gate/up/down_proj
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all(".language_model." in n and "lora_" in n for n in trainable)
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear layer"):
        VLMEncoder(_cfg(lora_target_modules=["qproj"]))


def test_missing_checkpoints_fail_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(OSError) as err:
        load_backbone(_cfg(vlm_name_or_path="Qwen/Qwen2.5-VL-3B-Instruct"))
    assert time.time() - t < 10
    msg = str(err.value)
    assert "huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct --local-dir" in msg and "vlm_name_or_path" in msg
    with pytest.raises(OSError, match="does not exist"):
        load_backbone(_cfg(vlm_name_or_path=str(tmp_path / "nowhere")))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' model; supported families"):
        load_backbone(_cfg(vlm_name_or_path=str(tmp_path / "bert")))

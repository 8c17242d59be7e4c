"""Frozen-vision cache: storage, keys and rebuilds; unusable images are masked and counted, never fatal."""
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from recbole_vlm2rec.encoder import EncoderConfig, VLMEncoder
from recbole_vlm2rec.encoder.vision_cache import VisionCache


def _write(path, seed, size=(48, 64)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


def _enc(tmp_path, **kw):
    cfg = dict(vlm_name_or_path="tiny-qwen2-vl", vlm_dtype="fp32", image_size=56, finetune="frozen")
    cfg.update(kw)
    return VLMEncoder(EncoderConfig(**cfg), cache_dir=str(tmp_path))


def test_vision_cache_store_roundtrip_and_rebuild(tmp_path):
    values = torch.randn(3, 2, 4, 8)
    cache = VisionCache(str(tmp_path), "f" * 64, 56, tokens_per_image=4, hidden=8, layers=2, dtype="bf16")
    rows = cache.put(["a", "b", "a"], values)
    assert rows.tolist() == [0, 1, 0] and len(cache) == 2
    assert cache.nbytes == 2 * 2 * 4 * 8 * 2
    torch.testing.assert_close(cache.get(rows[:2]).float(), values[:2].to(torch.bfloat16).float())
    assert cache.lookup(["b", "zzz"]).tolist() == [1, -1]
    # Reopened by another process: same rows.
    again = VisionCache(str(tmp_path), "f" * 64, 56, tokens_per_image=4, hidden=8, layers=2, dtype="bf16")
    assert again.lookup(["a", "b"]).tolist() == [0, 1]
    # Another key is another directory; a damaged directory is rebuilt.
    other = VisionCache(str(tmp_path), "e" * 64, 56, tokens_per_image=4, hidden=8, layers=2, dtype="bf16")
    assert len(other) == 0 and other.directory != cache.directory
    with open(os.path.join(cache.directory, "meta.json"), "w") as f:
        f.write('{"fingerprint": "other"}')
    rebuilt = VisionCache(str(tmp_path), "f" * 64, 56, tokens_per_image=4, hidden=8, layers=2, dtype="bf16")
    assert len(rebuilt) == 0 and rebuilt.nbytes == 0


def test_encoder_cache_is_keyed_by_image_size_backbone_and_file(tmp_path):
    img = _write(tmp_path / "a.png", 0)
    enc = _enc(tmp_path)
    stats = enc.warm_vision_cache([img, img, None, str(tmp_path / "gone.png")], batch_size=2, progress=False)
    assert stats == dict(images=4, cached_before=0, computed=1, missing=1, unreadable=0, no_image=1)
    cache = enc.vision_cache
    assert len(cache) == 1 and cache.nbytes == enc.image_preprocessor.tokens_per_image * enc.hidden_size * 2  # bf16
    assert enc.warm_vision_cache([img], progress=False)["cached_before"] == 1

    assert _enc(tmp_path, image_size=112).vision_cache.directory != cache.directory
    assert _enc(tmp_path, tiny_seed=1).vision_cache.directory != cache.directory  # other weights
    assert _enc(tmp_path).vision_cache.directory == cache.directory  # same backbone: reused

    before = enc.encode_items(["x"], [img]).image
    _write(tmp_path / "a.png", 1)  # the file changes: its tokens are recomputed
    os.utime(tmp_path / "a.png", ns=(1, 10 ** 18))
    after = enc.encode_items(["x"], [img]).image
    assert len(enc.vision_cache) == 2 and not torch.allclose(before, after)


def test_bf16_cache_is_close_to_the_uncached_path(tmp_path):
    imgs = [_write(tmp_path / f"{i}.png", i) for i in range(3)]
    cached = _enc(tmp_path).encode_items(["a", "b", "c"], imgs).image
    plain = _enc(tmp_path, vision_cache=False).encode_items(["a", "b", "c"], imgs).image
    assert torch.nn.functional.cosine_similarity(cached, plain).min() > 0.999


@pytest.mark.parametrize("vision_cache", [True, False])
def test_missing_and_corrupt_images_are_masked_and_counted(tmp_path, caplog, vision_cache):
    good = _write(tmp_path / "good.png", 0)
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    missing = str(tmp_path / "missing.png")
    enc = _enc(tmp_path, vision_cache=vision_cache)
    with caplog.at_level(logging.WARNING, logger="recbole_vlm2rec.encoder"):
        out = enc.encode_items(["", "b", "c", "d"], [good, str(corrupt), missing, None])
        users = enc.encode_users([["a"], ["b", "c"]], [[str(corrupt)], [missing, good]])
    assert out.image_mask.tolist() == [True, False, False, False]
    assert users.image_mask.tolist() == [False, True]
    assert torch.isfinite(out.text).all() and torch.isfinite(out.image).all()
    assert torch.allclose(out.text.norm(dim=-1), torch.tensor([0.0, 1, 1, 1]))  # the empty title: masked zero row
    assert out.text_mask.tolist() == [False, True, True, True]
    assert torch.all(out.image[1:] == 0)
    assert enc.image_stats == {"missing": 1, "unreadable": 1, "no_image": 1}  # each file counted once
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 image file(s) unusable" in warnings[0]
    none = enc.encode_items(["a"], [None])  # a batch without any image
    assert none.image_mask.tolist() == [False] and torch.all(none.image == 0)

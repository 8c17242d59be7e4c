"""Catalog encoding, the item-embedding cache, and the .npy + .json export format."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from recbole_vlm2rec.encoder import (EncoderConfig, VLMEncoder, encode_catalog, export_item_embeddings,
                                     load_item_embeddings)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    d = tmp_path_factory.mktemp("cat")
    rng = np.random.default_rng(3)
    texts, images = [], []
    for i in range(7):
        p = d / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(p)
        texts.append("item " * (7 - i) + str(i))
        images.append(None if i == 3 else str(p))
    return texts, images


def test_encode_catalog_matches_encode_items_and_is_cached(tmp_path, catalog):
    texts, images = catalog
    enc = VLMEncoder(EncoderConfig(vlm_name_or_path="tiny-qwen2-vl", vlm_dtype="fp32", image_size=56,
                                   lora_r=4, lora_dropout=0.0), cache_dir=str(tmp_path))
    enc.train()
    out = encode_catalog(enc, texts, images, batch_size=3, progress=False)
    assert enc.training  # mode restored
    assert set(out) == {"text", "image"} and out["text"].shape == (7, enc.hidden_size)
    enc.eval()
    with torch.no_grad():
        direct = enc.encode_items(texts, images)
    np.testing.assert_allclose(out["text"], direct.text.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["image"], direct.image.numpy(), atol=1e-5)
    assert not out["image"][3].any()

    again = encode_catalog(enc, texts, images, batch_size=3, progress=False)
    assert enc._catalog_cache is not None and all(np.array_equal(out[m], again[m]) for m in out)
    # An optimizer step changes the weights: the catalog is encoded anew.
    cached_key = enc._catalog_cache[0]
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=1.0)
    for p in enc.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()
    fresh = encode_catalog(enc, texts, images, batch_size=3, progress=False)
    assert enc._catalog_cache[0] != cached_key and not np.allclose(fresh["text"], out["text"])
    inter = encode_catalog(enc, texts, images, batch_size=4, progress=False, fusion="internal")
    assert set(inter) == {"interleaved"} and inter["interleaved"].shape == (7, enc.hidden_size)


def test_export_and_import_round_trip(tmp_path):
    tokens = ["i1", "i2", "i3"]
    text = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    image = text.copy()
    image[1] = 0
    paths = export_item_embeddings(str(tmp_path / "out" / "emb"), tokens, {"text": text, "image": image},
                                   {"backbone": "tiny-qwen2-vl", "adapter": None})
    assert sorted(os.listdir(tmp_path / "out")) == ["emb.image.json", "emb.image.npy", "emb.text.json", "emb.text.npy"]
    meta = json.loads((tmp_path / "out" / "emb.image.json").read_text())
    assert meta["item_tokens"] == tokens and meta["dim"] == 5 and meta["masked_rows"] == [1]
    assert meta["modality"] == "image" and meta["pooling"] == "last_token" and meta["normalization"] == "l2"

    arr, meta = load_item_embeddings(str(tmp_path / "out" / "emb"), "text")
    np.testing.assert_array_equal(arr, text)
    arr, _ = load_item_embeddings(paths["image"])
    np.testing.assert_array_equal(arr, image)
    # Rows follow the caller's item order; RecBole's padding token gets a zero row.
    arr, meta = load_item_embeddings(paths["text"], expected_tokens=["[PAD]", "i3", "i1", "i2"])
    np.testing.assert_array_equal(arr, np.vstack([np.zeros(5), text[[2, 0, 1]]]))
    assert meta["item_tokens"][0] == "[PAD]"


def test_import_errors_are_clear(tmp_path):
    prefix = str(tmp_path / "emb")
    export_item_embeddings(prefix, ["a", "b"], {"text": np.ones((2, 4)), "image": np.ones((2, 4))})
    with pytest.raises(FileNotFoundError, match="emb.video.npy.*modalities under this prefix: \\['image', 'text'\\]"):
        load_item_embeddings(prefix, "video")
    with pytest.raises(ValueError, match="several modalities"):
        load_item_embeddings(prefix)
    with pytest.raises(ValueError, match="dimension 4, expected 8"):
        load_item_embeddings(prefix, "text", expected_dim=8)
    with pytest.raises(ValueError, match="not in the file, e.g. \\['c'\\]"):
        load_item_embeddings(prefix, "text", expected_tokens=["a", "c"])
    with pytest.raises(ValueError, match="3 rows for 2 item tokens"):
        export_item_embeddings(prefix, ["a", "b"], {"text": np.ones((3, 4))})
    with pytest.raises(ValueError, match="NaN"):
        export_item_embeddings(prefix, ["a", "b"], {"text": np.array([[1.0, np.nan], [0, 1]])})
    # A user's own array: NaN, a sidecar that disagrees, or rows that do not fit.
    np.save(tmp_path / "user.npy", np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_item_embeddings(str(tmp_path / "user.npy"))
    np.save(tmp_path / "user.npy", np.ones((3, 2)))
    with pytest.raises(ValueError, match="3 rows for 2 expected item tokens"):
        load_item_embeddings(str(tmp_path / "user.npy"), expected_tokens=["a", "b"])
    (tmp_path / "user.json").write_text(json.dumps({"item_tokens": ["a", "b"], "dim": 2}))
    with pytest.raises(ValueError, match="3 rows but its sidecar lists 2"):
        load_item_embeddings(str(tmp_path / "user.npy"))
    (tmp_path / "user.json").write_text(json.dumps({"item_tokens": ["a", "b", "c"], "dim": 5}))
    with pytest.raises(ValueError, match="dimension 2 but its sidecar says 5"):
        load_item_embeddings(str(tmp_path / "user.npy"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_item_embeddings(str(tmp_path / "nothing.npy"))
    np.save(tmp_path / "bare.npy", np.ones((2, 3)))  # no sidecar: rows must follow expected_tokens
    arr, meta = load_item_embeddings(str(tmp_path / "bare.npy"), expected_tokens=["a", "b"], expected_dim=3)
    assert arr.shape == (2, 3) and meta == {}

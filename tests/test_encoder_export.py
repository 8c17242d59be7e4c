"""Catalog encoding, the one item-embedding cache, and the .npy + .json export format."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from recbole_vlm2rec.encoder import EncoderConfig, VLMEncoder
from recbole_vlm2rec.fusion import fuse
from recbole_vlm2rec.item_embeddings import export_item_embeddings, load_item_embeddings


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


def _tiny_encoder(tmp_path):
    return VLMEncoder(EncoderConfig(vlm_name_or_path="tiny-qwen2-vl", vlm_dtype="fp32", image_size=56,
                                    lora_r=4, lora_dropout=0.0), cache_dir=str(tmp_path))


def test_encode_catalog_matches_encode_items_and_is_cached(tmp_path, catalog):
    texts, images = catalog
    enc = _tiny_encoder(tmp_path)
    enc.train()
    out = enc.encode_catalog(texts, images, batch_size=3, progress=False)
    assert enc.training  # mode restored
    assert set(out) == {"text", "image", "text_mask", "image_mask", "fused"}
    assert out["text"].shape == (7, enc.hidden_size)
    enc.eval()
    with torch.no_grad():
        direct = enc.encode_items(texts, images)
    torch.testing.assert_close(out["text"], direct.text, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["image"], direct.image, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["fused"], fuse(direct.text, direct.image, direct.image_mask), atol=1e-5, rtol=0)
    assert not out["image"][3].any() and out["image_mask"].tolist() == [i != 3 for i in range(7)]

    first = enc.encode_catalog(texts, images, batch_size=3, progress=False)
    assert enc.catalog_is_cached(texts, images)
    again = enc.encode_catalog(texts, images, batch_size=3, progress=False)
    assert all(again[m] is first[m] for m in first)  # kept, not encoded again
    inter = enc.encode_catalog(texts, images, batch_size=4, progress=False, fusion="internal")
    assert set(inter) == {"interleaved"} and inter["interleaved"].shape == (7, enc.hidden_size)


def _step(enc, optimizer_class, **kwargs):
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = optimizer_class(params, lr=0.5, **kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


@pytest.mark.parametrize("change", ["sgd", "adam", "adam_foreach", "load_state_dict", "train"])
def test_catalog_is_encoded_again_after_any_weight_change(tmp_path, catalog, change):
    """Each of these may change the weights: the kept catalog must never be returned after it."""
    texts, images = catalog
    enc = _tiny_encoder(tmp_path)
    other = _tiny_encoder(tmp_path / "other")
    _step(other, torch.optim.SGD)  # weights that differ from enc's
    before = enc.encode_catalog(texts, images, batch_size=4, progress=False)
    version = enc.weights_version()
    if change == "sgd":
        _step(enc, torch.optim.SGD)
    elif change == "adam":
        _step(enc, torch.optim.Adam)  # RecBole's default optimizer
    elif change == "adam_foreach":
        _step(enc, torch.optim.Adam, foreach=True)
    elif change == "load_state_dict":
        enc.load_state_dict(other.state_dict())
    else:
        enc.train()
        enc.eval()
    assert enc.weights_version() != version and not enc.catalog_is_cached(texts, images)
    after = enc.encode_catalog(texts, images, batch_size=4, progress=False)
    if change != "train":
        assert not torch.allclose(after["text"], before["text"])
    if change == "load_state_dict":
        expected = other.encode_catalog(texts, images, batch_size=4, progress=False)
        torch.testing.assert_close(after["fused"], expected["fused"], atol=1e-6, rtol=0)


def test_item_without_text_is_masked_not_an_empty_prompt(tmp_path, catalog):
    texts, images = list(catalog[0]), list(catalog[1])
    texts[1], texts[3] = "", "   "  # item 3 has no image either
    enc = _tiny_encoder(tmp_path)
    with torch.no_grad():
        out = enc.encode_items(texts, images)
        users = enc.encode_users([["", " "], [texts[0], ""]], [[images[1], None], [None, None]])
    assert out.text_mask.tolist() == [True, False, True, False, True, True, True]
    assert not out.text[1].any() and not out.text[3].any()
    fused = out.fused()
    torch.testing.assert_close(fused[1], out.image[1])  # its image alone
    assert not fused[3].any()  # neither modality: a zero vector that scores 0 against everything
    assert users.text_mask.tolist() == [False, True] and users.image_mask.tolist() == [True, False]


def test_export_and_import_round_trip(tmp_path):
    tokens = ["i1", "i2", "i3"]
    text = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    image = text.copy()
    image[1] = 0
    paths = export_item_embeddings(str(tmp_path / "out" / "emb"), tokens, {"text": text, "image": image},
                                   {"backbone": "tiny-qwen2-vl", "adapter": None})
    assert sorted(os.listdir(tmp_path / "out")) == ["emb.image.json", "emb.image.npy", "emb.text.json", "emb.text.npy"]
    umask = os.umask(0o022)
    os.umask(umask)
    for name in os.listdir(tmp_path / "out"):  # the mode open() gives, not mkstemp's 0600
        assert os.stat(tmp_path / "out" / name).st_mode & 0o777 == 0o666 & ~umask
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

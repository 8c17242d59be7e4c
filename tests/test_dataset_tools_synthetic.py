"""Synthetic catalog (planted signal, determinism), the vlm2rec-demo dataset, and from-sequences."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_tools.atomic import read_item_sidecar
from dataset_tools.cli import main
from dataset_tools.demo import DEMO_NAME, ensure_demo_dataset
from dataset_tools.sequences import convert_sequences
from dataset_tools.synthetic import (PATTERNS, THEMES, SyntheticSpec, attribute_ceilings, build_synthetic,
                                     draw_pattern, oracle_hit_rates, read_latent)

REPO = Path(__file__).resolve().parents[1]
BEAUTY = REPO.parent / "shared" / "data" / "amazon-beauty-2014-5core" / "Beauty.inter.json"


def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    spec = SyntheticSpec(seed=7, items=96, users=120, image_size=32)
    for out in ("a", "b"):
        build_synthetic(tmp_path / out, "syn", spec, kcore=2, progress=False)
    assert tree_bytes(tmp_path / "a" / "syn") == tree_bytes(tmp_path / "b" / "syn")
    build_synthetic(tmp_path / "c", "syn", SyntheticSpec(seed=8, items=96, users=120, image_size=32), kcore=2,
                    progress=False)
    assert (tmp_path / "a/syn/syn.inter").read_bytes() != (tmp_path / "c/syn/syn.inter").read_bytes()


def test_synthetic_cli_writes_amazon_2023_raw_files_and_converts(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path), "--dataset", "syn", "--seed", "3", "--items", "80",
                 "--users", "100", "--image-size", "24", "--kcore", "2", "--no-progress"]) == 0
    d = tmp_path / "syn"
    meta = [json.loads(line) for line in (d / "raw" / "meta.jsonl").read_text().splitlines()]
    review = json.loads((d / "raw" / "reviews.jsonl").read_text().splitlines()[0])
    assert {"parent_asin", "title", "images", "store", "categories"} <= meta[0].keys()
    assert meta[0]["images"][0]["large"].startswith("images/") and meta[0]["images"][0]["hi_res"] is None
    assert {"user_id", "parent_asin", "rating", "timestamp"} <= review.keys() and review["timestamp"] > 1e12
    stats = json.loads((d / "syn.stats.json").read_text())
    assert stats["source"]["kind"] == "synthetic" and stats["share_items_with_image"] == 1.0
    assert stats["problems"] == {}
    printed = capsys.readouterr().out
    assert "planted signal, Hit@10 of oracles" in printed and "attribute ceilings, expected test NDCG@10" in printed


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    build_synthetic(out, "syn", SyntheticSpec(seed=1, items=300, users=600, image_size=16), progress=False)
    return out / "syn"


def test_oracle_with_both_attributes_beats_either_alone(catalog):
    rates = oracle_hit_rates(catalog, "syn")
    assert rates["both"] > rates["text"] + 0.1 and rates["both"] > rates["image"] + 0.1
    assert min(rates["text"], rates["image"]) > rates["popularity"] + 0.05


def _hand_made_catalog(root: Path) -> Path:
    """Six items, (theme, pattern): i1 (0,0), i2 (0,1), i3 (1,1), i4 (1,0), i5 (1,1), i6 (0,0); user u1 bought
    i1, i2, i3 in that order (valid target i2 after [i1], test target i3 after [i1, i2]), u2 i4, i5, i6."""
    d = root / "hand"
    d.mkdir()
    attributes = {"i1": (0, 0), "i2": (0, 1), "i3": (1, 1), "i4": (1, 0), "i5": (1, 1), "i6": (0, 0)}
    latent = {"spec": {"text_signal": 1.0, "image_signal": 1.0},
              "items": {k: {"text": t, "image": v} for k, (t, v) in attributes.items()}}
    (d / "hand.latent.json").write_text(json.dumps(latent))
    rows = ["u1\ti1\t5\t1", "u1\ti2\t5\t2", "u1\ti3\t5\t3", "u2\ti4\t5\t1", "u2\ti5\t5\t2", "u2\ti6\t5\t3"]
    (d / "hand.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                  + "\n".join(rows) + "\n")
    return d


def test_attribute_ceilings_known_answers(tmp_path):
    """Exact expectations over a random order of tied items, counted by hand on six items."""
    d = _hand_made_catalog(tmp_path)
    log2 = np.log2
    ranked = attribute_ceilings(d, "hand", k=2)  # RecBole's sequential full ranking: history items compete
    masked = attribute_ceilings(d, "hand", k=2, exclude_history=True)
    # test, u1: last history item i2 (theme 0, pattern 1), target i3 (1, 1). image: i2, i3, i5 tie at the top,
    # i3 at rank 1, 2 or 3 -> hit@2 2/3, NDCG@2 (1 + 1/log2 3) / 3. With the history left out only i3 and i5 tie.
    # u2: last i5 (1, 1), target i6 (0, 0): three pattern-1 items above it either way, nothing in the top 2.
    assert ranked["test"]["image"]["hit@2"] == pytest.approx((2 / 3 + 0) / 2)
    assert ranked["test"]["image"]["ndcg@2"] == pytest.approx(((1 + 1 / log2(3)) / 3 + 0) / 2)
    assert masked["test"]["image"]["hit@2"] == pytest.approx((1 + 0) / 2)
    assert masked["test"]["image"]["ndcg@2"] == pytest.approx(((1 + 1 / log2(3)) / 2 + 0) / 2)
    # both (weights 1, 1), u1: i2 scores 2; i1, i3, i5, i6 score 1 -> i3 at rank 2..5: hit@2 1/4.
    # u2: i3, i5 score 2, i2, i4 1, the target i6 and i1 0 -> rank 5 or 6.
    assert ranked["test"]["both"]["hit@2"] == pytest.approx((1 / 4 + 0) / 2)
    assert ranked["test"]["both"]["ndcg@2"] == pytest.approx((1 / log2(3) / 4 + 0) / 2)
    # none: every item ties, 6 of them -> hit@2 2/6 for everyone
    assert ranked["valid"]["none"]["hit@2"] == pytest.approx(2 / 6)
    # valid, u1: last i1 (0, 0), target i2 (0, 1); text: i1 i2 i6 tie at the top (the test item i3 competes
    # but does not tie) -> hit@2 2/3. u2: last i4 (1, 0), target i5 (1, 1): i3 i4 i5 tie -> 2/3.
    assert ranked["valid"]["text"]["hit@2"] == pytest.approx(2 / 3)
    assert masked["valid"]["text"]["hit@2"] == pytest.approx(1.0)  # i1 / i4 left out: two tied, both inside


def test_signal_knob_removes_a_modality(tmp_path):
    build_synthetic(tmp_path, "notext", SyntheticSpec(seed=1, items=300, users=600, image_size=16, text_signal=0.0),
                    progress=False)
    rates = oracle_hit_rates(tmp_path / "notext", "notext")
    assert rates["text"] < rates["popularity"] + 0.05       # the theme no longer predicts the next item
    assert rates["image"] > rates["popularity"] + 0.1


def test_titles_reveal_the_theme_and_nothing_else_does(catalog):
    latent = read_latent(catalog, "syn")
    text = read_item_sidecar(catalog, "syn")
    for item_id, rec in text.items():
        theme = latent["items"][item_id]["text"]
        title_words = set(re.findall(r"[a-z]+", rec["title"].lower()))
        all_words = title_words | set(re.findall(r"[a-z]+", rec["description"].lower()))
        assert title_words & set(THEMES[theme][1])
        others = {w for k, (_, words) in enumerate(THEMES) if k != theme for w in words}
        assert not all_words & others
        assert len(rec["title"].split()) <= 12
    # Neither brand nor categories carry a latent attribute: every brand spans several themes.
    themes_of_brand = {}
    for item_id, rec in text.items():
        themes_of_brand.setdefault(rec["brand"], set()).add(latent["items"][item_id]["text"])
    assert all(len(t) > 1 for t in themes_of_brand.values())


def _same_class_nn(features: np.ndarray, labels: np.ndarray) -> float:
    f = features - features.mean(0)
    f = f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-9)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    return float(np.mean(labels[sim.argmax(1)] == labels))


def test_image_attribute_needs_learning():
    """Colour and untrained conv features barely beat chance; a colour-blind structural feature (the
    spectrum of the image) finds the pattern almost always: the signal is there, but must be learned."""
    n_classes, n = 6, 360
    labels = np.arange(n) % n_classes
    imgs = np.stack([draw_pattern(int(c), 56, np.random.default_rng([5, k])) for k, c in enumerate(labels)])
    x = imgs.astype(np.float32) / 255.0
    chance = 1 / n_classes
    assert _same_class_nn(x.mean((1, 2)), labels) < chance + 0.1
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with torch.no_grad():
        random_features = net(torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1).numpy()
    assert _same_class_nn(random_features, labels) < chance + 0.25
    pooled = x.reshape(n, 28, 2, 28, 2, 3).mean((2, 4))              # 2x2 average: less pixel noise
    centred = np.linalg.norm(pooled - pooled.mean((1, 2), keepdims=True), axis=3)   # colour-blind contrast
    spectrum = np.abs(np.fft.fft2(centred - centred.mean((1, 2), keepdims=True)))
    assert _same_class_nn(np.log1p(spectrum).reshape(n, -1), labels) > 0.85
    assert len(PATTERNS) >= n_classes


_ENSURE = "import sys; from dataset_tools.demo import ensure_demo_dataset; print(ensure_demo_dataset(sys.argv[1]))"


def test_demo_builds_once_atomically_even_when_raced(tmp_path):
    data_path = tmp_path / "data"
    abandoned = data_path / f".{DEMO_NAME}.tmp-999999999-x"        # left by a killed build (no such pid)
    abandoned.mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", _ENSURE, str(data_path)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    target = data_path / DEMO_NAME
    assert {o.strip() for o, _ in outs} == {str(target)}
    assert os.listdir(data_path) == [DEMO_NAME]                      # no staging directory left behind

    stats = json.loads((target / f"{DEMO_NAME}.stats.json").read_text())
    assert stats["users"] == 1000 and 300 <= stats["items"] <= 400
    assert 5 <= stats["mean_sequence_length"] <= 20 and stats["share_items_with_image"] == 1.0
    text = read_item_sidecar(target, DEMO_NAME)
    assert all(len(r["title"].split()) < 12 for r in text.values())
    with Image.open(target / next(iter(text.values()))["image"]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    assert set(read_latent(target, DEMO_NAME)["items"]) >= set(text)

    before = (target / f"{DEMO_NAME}.stats.json").stat().st_mtime_ns
    assert ensure_demo_dataset(data_path) == target                   # already there: nothing rebuilt
    assert (target / f"{DEMO_NAME}.stats.json").stat().st_mtime_ns == before

    squatted = tmp_path / "other" / DEMO_NAME
    squatted.mkdir(parents=True)
    (squatted / "notes.txt").write_text("someone's file")
    with pytest.raises(FileExistsError, match="not a complete"):
        ensure_demo_dataset(tmp_path / "other")


def test_from_sequences(tmp_path):
    src = tmp_path / "seq.json"
    src.write_text(json.dumps({"7": [3, 1, 3, 2], "8": ["1", "2"], "9": "oops", "10": [1, None, 2.5, 2]}))
    result = convert_sequences(src, tmp_path, "seq")
    lines = (tmp_path / "seq" / "seq.inter").read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert lines[1:] == ["10\t1\t1", "10\t2\t2", "7\t3\t1", "7\t1\t2", "7\t3\t3", "7\t2\t4", "8\t1\t1", "8\t2\t2"]
    s = result.stats
    assert (s["users"], s["items"], s["interactions"]) == (3, 3, 8)
    assert s["source"]["repeated_items_in_sequences"] == 1
    assert result.problems.counts == {"sequence_not_a_list": 1, "sequence_bad_item": 1}
    assert {p.where for p in result.problems.entries} == {f"{src}: user 9", f"{src}: user 10"}
    assert not (tmp_path / "seq" / "seq.item").exists()


ITEMS = {  # the same items in both layouts below; entities, padding and a comma-separated category path
    "A1": {"title": "Ultra &amp; Gentle  Pen ", "description": "Blue ink &lt;0.5 mm&gt;", "brand": "Pen&amp;Co",
           "categories": ["Office Products", "Writing", "Pens"]},
    "A2": {"title": "Stapler", "description": "", "brand": "", "categories": ["Office Products", "Staplers"]},
    "A3": {"title": "Sticky notes, 12 pack", "description": "Yellow", "brand": "Notely",
           "categories": ["Office Products"]},
}
SEQUENCES = {"u1": ["A1", "A2", "A3"], "u2": ["A2", "A1"], "u3": ["A3", "A1", "A2"]}


def test_from_sequences_items_match_the_amazon_converter(tmp_path):
    """The {item: {title, description, brand, categories}} layout gives the sidecar and .item that the Amazon
    converter writes for the same items (given as 2018 metadata and reviews)."""
    meta, reviews = [], []
    for item, fields in ITEMS.items():
        meta.append({"asin": item, "title": fields["title"], "description": [fields["description"]],
                     "brand": fields["brand"], "category": fields["categories"], "imageURL": []})
    for user, items in SEQUENCES.items():
        reviews += [{"reviewerID": user, "asin": item, "overall": 5.0, "unixReviewTime": 1600000000 + n}
                    for n, item in enumerate(items)]
    (tmp_path / "meta.json").write_text("\n".join(map(json.dumps, meta)) + "\n")
    (tmp_path / "reviews.json").write_text("\n".join(map(json.dumps, reviews)) + "\n")
    assert main(["amazon", "--reviews", str(tmp_path / "reviews.json"), "--meta", str(tmp_path / "meta.json"),
                 "--out", str(tmp_path), "--dataset", "amz", "--kcore", "0", "--no-progress"]) == 0

    layout = {item: dict(fields, categories=", ".join(fields["categories"])) for item, fields in ITEMS.items()}
    layout["A9"] = {"title": "in no sequence"}
    (tmp_path / "items.json").write_text(json.dumps(layout))
    (tmp_path / "seq.json").write_text(json.dumps({**SEQUENCES, "u4": ["A1", "B7"]}))
    assert main(["from-sequences", "--input", str(tmp_path / "seq.json"), "--items", str(tmp_path / "items.json"),
                 "--out", str(tmp_path), "--dataset", "seq"]) == 0
    ours, theirs = read_item_sidecar(tmp_path / "seq", "seq"), read_item_sidecar(tmp_path / "amz", "amz")
    assert ours["A1"]["title"] == "Ultra & Gentle  Pen" and ours["A1"]["brand"] == "Pen&Co"
    assert {k: ours[k] for k in theirs} == theirs
    assert ours["B7"] == {"item_id": "B7", "title": "", "description": "", "categories": [], "brand": "",
                          "image": None}
    item_rows = (tmp_path / "seq" / "seq.item").read_text().splitlines()
    assert item_rows[:4] == (tmp_path / "amz" / "amz.item").read_text().splitlines()
    stats = json.loads((tmp_path / "seq" / "seq.stats.json").read_text())
    assert stats["problems"] == {"item_without_metadata": 1} and stats["source"]["metadata_items_not_in_sequences"] == 1
    assert stats["items_with_text"] == 3


@pytest.mark.skipif(not BEAUTY.is_file(), reason="shared Amazon Beauty data not present")
def test_from_sequences_on_amazon_beauty(tmp_path):
    assert main(["from-sequences", "--input", str(BEAUTY), "--out", str(tmp_path), "--dataset", "beauty"]) == 0
    stats = json.loads((tmp_path / "beauty" / "beauty.stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (22363, 12101, 198502)
    assert stats["problems"] == {}


def test_dark_on_light_patterns_keep_their_polarity_and_random_is_unchanged():
    """dark-on-light: every pattern pixel darker than every background pixel (noise aside); the default
    (random) draws exactly what it drew before the option existed, so vlm2rec-demo keeps its bytes."""
    for pattern in range(len(PATTERNS)):
        rng = np.random.default_rng([4, pattern])
        img = draw_pattern(pattern, 48, rng, colours="dark-on-light").astype(float).mean(axis=2)
        dark, light = img[img < 127.5], img[img >= 127.5]
        assert dark.size and light.size and dark.max() < 110 and light.min() > 140
    a = draw_pattern(3, 32, np.random.default_rng(9))
    b = draw_pattern(3, 32, np.random.default_rng(9), colours="random")
    assert (a == b).all()
    with pytest.raises(ValueError, match="image_colours must be one of"):
        SyntheticSpec(image_colours="pastel").check()


def test_synthetic_cli_passes_the_attribute_options(tmp_path):
    assert main(["synthetic", "--out", str(tmp_path), "--dataset", "syn", "--seed", "3", "--items", "60",
                 "--users", "80", "--image-size", "24", "--kcore", "2", "--text-values", "3", "--image-values", "2",
                 "--image-colours", "dark-on-light", "--no-progress"]) == 0
    latent = read_latent(tmp_path / "syn", "syn")
    assert latent["spec"]["image_colours"] == "dark-on-light"
    assert len(latent["text_attribute"]["values"]) == 3 and len(latent["image_attribute"]["values"]) == 2

"""``vlm2rec-data amazon`` on the hand-written fixtures of each release (tests/fixtures/amazon/).

Every expected number below is counted by hand from the fixture files; the comments say how.
"""
import gzip
import json
import os
import random
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dataset_tools import amazon
from dataset_tools.atomic import SidecarError, atomic_path, read_item_sidecar
from dataset_tools.cli import main
from dataset_tools.problems import FatalInputError, Problems
from helpers import image_bytes

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "amazon"


def run_cli(*args):
    return main([str(a) for a in args])


def read_rows(path):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def load_stats(dataset_dir, name):
    return json.loads((dataset_dir / f"{name}.stats.json").read_text(encoding="utf-8"))


def problems_of(dataset_dir, name):
    return [json.loads(line) for line in (dataset_dir / f"{name}.problems.jsonl").read_text().splitlines()]


def filters_by_step(stats):
    return {f["step"]: (f["removed_interactions"], f["removed_users"], f["removed_items"]) for f in stats["filters"]}


def copy_with_host(src, dst, base_url):
    dst.write_text(src.read_text(encoding="utf-8").replace("http://HOST", base_url), encoding="utf-8")
    return dst


# ------------------------------------------------------------------------------------------------ 2014

@pytest.fixture
def images_2014(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "B001.jpg").write_bytes(image_bytes("JPEG", (80, 60)))            # found by item id
    (d / "B002.png").write_bytes(image_bytes("PNG", (50, 50), "RGBA"))     # transparent PNG
    (d / "51abc.jpg").write_bytes(image_bytes("JPEG", (30, 90), "L"))      # B003, found by URL basename
    (d / "B004.jpg").write_bytes(b"\xff\xd8\xff garbage")                   # corrupt
    return d


def test_2014_conversion(tmp_path, images_2014, capsys):
    out = tmp_path / "out"
    rc = run_cli("amazon", "--reviews", FIXTURES / "2014/reviews.json", "--meta", FIXTURES / "2014/meta.json",
                 "--out", out, "--dataset", "fx2014", "--kcore", "3", "--images-dir", images_2014,
                 "--image-size", "32", "--no-progress")
    assert rc == 0
    d = out / "fx2014"
    stats = load_stats(d, "fx2014")
    assert stats["source"]["version"] == "2014" and stats["source"]["version_detected"]
    # 25 lines: 1 blank, 2 malformed (10, 12), 1 without asin (17), 1 with a non-numeric time (21)
    # -> 20 reviews read.
    assert stats["source"]["reviews_read"] == 20
    assert filters_by_step(stats) == {
        "drop_items_without_meta": (2, 0, 1),   # B009 (its meta line is broken): U1 and U5 reviews
        "dedupe_user_item": (2, 0, 0),          # U2-B001 again later; U3-B002 earlier one kept
        "kcore": (3, 2, 1),                     # U5 (B005 only), U6 (2 reviews); B005 then empty
    }
    assert stats["filters"][-1]["rounds"] == 2
    # U1: B001-B004, U2: B001-B003, U3: B002-B004, U4: B001 B004 B002 -> 13 interactions.
    assert (stats["users"], stats["items"], stats["interactions"]) == (4, 4, 13)
    assert stats["density"] == pytest.approx(13 / 16) and stats["mean_sequence_length"] == pytest.approx(3.25)
    assert stats["problems"] == {
        "image_corrupt": 1,                     # B004.jpg
        "meta_duplicate_item": 1,               # meta line 4 (B002 again)
        "meta_malformed_line": 1,               # meta line 6 (B009, unterminated string)
        "meta_missing_key": 1,                  # meta line 7 (no asin)
        "meta_missing_title": 1,                # meta line 8 (B004)
        "review_bad_field": 1,                  # line 21
        "review_malformed_line": 2,             # lines 10 and 12
        "review_missing_field": 1,              # line 17
    }
    assert stats["images"]["counts"] == {"corrupt": 1, "ok": 3}
    assert stats["items_with_image"] == 3 and stats["share_items_with_image"] == 0.75
    assert stats["items_with_text"] == 4       # B004 has a description but no title

    where = {(p["kind"], p["where"]) for p in problems_of(d, "fx2014")}
    reviews, meta = FIXTURES / "2014/reviews.json", FIXTURES / "2014/meta.json"
    for kind, line in (("review_malformed_line", 10), ("review_malformed_line", 12),
                       ("review_missing_field", 17), ("review_bad_field", 21)):
        assert (kind, f"{reviews}:{line}") in where
    for kind, line in (("meta_duplicate_item", 4), ("meta_malformed_line", 6), ("meta_missing_key", 7)):
        assert (kind, f"{meta}:{line}") in where
    assert ("image_corrupt", "item B004") in where
    err = capsys.readouterr()
    assert f"{reviews}:10: review_malformed_line" in err.err and "bad input: 9" in err.out

    header, rows = read_rows(d / "fx2014.inter")
    assert header == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    assert rows[:4] == [["U1", "B001", "5.0", "1300000100"], ["U1", "B002", "4.0", "1300000200"],
                        ["U1", "B003", "2.0", "1300000300"], ["U1", "B004", "5.0", "1300000400"]]  # time order
    assert ["U2", "B001", "4.0", "1300001000"] in rows                      # the earliest duplicate
    assert ["U3", "B002", "3.0", "1300005000"] in rows
    assert ["U3", "B004", "", "1300007000"] in rows                         # no rating given
    assert ["U4", "B004", "4.0", "1300011000"] in rows                      # "4.0" as a string

    header, rows = read_rows(d / "fx2014.item")
    assert header == ["item_id:token", "categories:token_seq", "brand:token", "image:token"]
    items = {r[0]: r for r in rows}
    assert items["B001"] == ["B001", "Beauty Skin_Care Lips Makeup_&_Tools", "L'Oréal_Paris", "images/B001.jpg"]
    assert items["B004"] == ["B004", "Beauty Fragrance", "Brand_With_Spaces", ""]

    text = read_item_sidecar(d, "fx2014")
    assert set(text) == {"B001", "B002", "B003", "B004"}
    assert text["B001"] == {"item_id": "B001", "title": "Crème Brûlée Lip Balm & Scrub",
                            "description": "A balm for dry lips.\nUse daily.",
                            "categories": ["Beauty", "Skin Care", "Lips", "Makeup & Tools"],
                            "brand": "L'Oréal Paris", "image": "images/B001.jpg"}
    assert text["B003"]["title"] == '"Rose" Water 100% \u2014 200ml'
    assert text["B003"]["image"] == "images/B003.jpg"
    assert text["B004"]["title"] == "" and text["B004"]["brand"] == "Brand  With   Spaces"
    for item in ("B001", "B002", "B003"):
        with Image.open(d / text[item]["image"]) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
    with Image.open(d / text["B002"]["image"]) as im:
        assert im.getpixel((16, 16)) == (255, 255, 255)                 # transparency -> white


def test_rerun_gives_same_files_and_reuses_images(tmp_path, images_2014):
    args = ["amazon", "--reviews", FIXTURES / "2014/reviews.json", "--meta", FIXTURES / "2014/meta.json",
            "--out", tmp_path, "--dataset", "again", "--kcore", "3", "--images-dir", images_2014, "--no-progress"]
    assert run_cli(*args) == 0
    d = tmp_path / "again"
    first = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.suffix != ".json"}
    (d / ".again.inter.tmp-123-abc").write_text("left by a killed run")
    assert run_cli(*args) == 0
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.suffix != ".json"} == first
    stats = load_stats(d, "again")
    assert stats["images"]["resumed"] == 3 and stats["images"]["processed"] == 1   # the corrupt one again


def test_require_image_drops_items_without_one_then_kcore_again(tmp_path, images_2014):
    assert run_cli("amazon", "--reviews", FIXTURES / "2014/reviews.json", "--meta", FIXTURES / "2014/meta.json",
                   "--out", tmp_path, "--dataset", "img", "--kcore", "2", "--images-dir", images_2014,
                   "--require-image", "--no-progress") == 0
    stats = load_stats(tmp_path / "img", "img")
    steps = [(f["step"], f["removed_interactions"], f["removed_users"], f["removed_items"]) for f in stats["filters"]]
    assert steps == [("drop_items_without_meta", 2, 0, 1), ("dedupe_user_item", 2, 0, 0),
                     ("kcore", 1, 1, 1),            # U5 (B005 only); U6 with 2 reviews stays in a 2-core
                     ("require_image", 3, 0, 1),    # B004's image is corrupt: U1, U3, U4 lose it
                     ("kcore", 0, 0, 0)]
    assert (stats["users"], stats["items"], stats["interactions"]) == (5, 3, 12)
    assert stats["share_items_with_image"] == 1.0


def test_2014_ratings_csv(tmp_path):
    # ratings.csv: 11 lines; line 9 rating "oops", line 10 two fields -> 9 interactions of 3 users.
    assert run_cli("amazon", "--reviews", FIXTURES / "2014/ratings.csv", "--meta", FIXTURES / "2014/meta.json",
                   "--out", tmp_path, "--dataset", "csv", "--kcore", "0", "--no-progress") == 0
    stats = load_stats(tmp_path / "csv", "csv")
    assert (stats["users"], stats["items"], stats["interactions"]) == (3, 4, 9)
    assert stats["problems"]["review_bad_field"] == 1 and stats["problems"]["review_malformed_line"] == 1
    assert stats["images"]["counts"] == {"not_fetched": 4}


# ------------------------------------------------------------------------------------------------ 2018

def test_2018_conversion_with_downloads(tmp_path, image_server):
    s = image_server
    s.add("/ok1.jpg", image_bytes("JPEG", (120, 80)))
    s.add("/ok2.png", image_bytes("PNG", (40, 40), "RGBA"))
    s.add("/corrupt.jpg", b"GIF89a truncated")
    s.add("/slow.jpg", image_bytes(), delay=1.0)
    meta = copy_with_host(FIXTURES / "2018/meta.json", tmp_path / "meta.json", s.base)
    reviews = FIXTURES / "2018/reviews.json"
    rc = run_cli("amazon", "--reviews", reviews, "--meta", meta, "--out", tmp_path, "--dataset", "fx2018",
                 "--kcore", "2", "--min-rating", "2", "--download-images", "--timeout", "0.3", "--retries", "1",
                 "--backoff", "0.01", "--image-size", "24", "--no-progress")
    assert rc == 0
    d = tmp_path / "fx2018"
    stats = load_stats(d, "fx2018")
    assert stats["source"]["version"] == "2018"
    # 21 lines: line 10 is an array, 14 not UTF-8, 11 has reviewerID null -> 18 reviews.
    assert stats["source"]["reviews_read"] == 18
    assert filters_by_step(stats) == {
        "drop_items_without_meta": (1, 0, 1),   # V1-C009
        "dedupe_user_item": (1, 0, 0),          # V1-C001 again
        "min_rating": (2, 0, 0),                # V4-C002 rated 1, V2-C003 without rating
        "kcore": (1, 1, 0),                     # V5 (one review)
    }
    assert (stats["users"], stats["items"], stats["interactions"]) == (4, 5, 13)
    assert stats["problems"] == {
        "image_corrupt": 1,                     # C004: body is not an image
        "image_download_failed": 1,             # C005: times out twice
        "image_missing": 1,                     # C003: 404
        "meta_bad_field": 1,                    # C002 description is an object
        "meta_missing_key": 1,                  # asin 12345 is not a string
        "review_malformed_line": 2,
        "review_missing_field": 1,
    }
    assert stats["images"]["counts"] == {"corrupt": 1, "failed": 1, "missing": 1, "ok": 2}
    assert s.hits["/ok2.png"] == 1 and s.hits["/never.jpg"] == 0 and s.hits["/small1.jpg"] == 0
    where = {(p["kind"], p["where"]) for p in problems_of(d, "fx2018")}
    assert {("review_malformed_line", f"{reviews}:10"), ("review_malformed_line", f"{reviews}:14"),
            ("review_missing_field", f"{reviews}:11"), ("meta_bad_field", f"{meta}:2"),
            ("meta_missing_key", f"{meta}:7"), ("image_missing", "item C003"),
            ("image_corrupt", "item C004"), ("image_download_failed", "item C005")} <= where

    text = read_item_sidecar(d, "fx2018")
    assert text["C001"]["title"] == "Ultra & Gentle Shampoo \u2014 250 ml"
    assert text["C001"]["brand"] == "Hair&Co"
    assert text["C001"]["categories"] == ["Beauty", "Hair Care", "Shampoo & Conditioner"]
    assert text["C001"]["description"] == "Line one.\nLine two with <b>markup</b>\nSulfate free"
    assert text["C002"]["description"] == "" and text["C002"]["image"] == "images/C002.jpg"
    assert [text[i]["image"] for i in ("C003", "C004", "C005")] == [None, None, None]
    header, rows = read_rows(d / "fx2018.item")
    assert {r[0]: r[1] for r in rows}["C001"] == "Beauty Hair_Care Shampoo_&_Conditioner"


def test_metadata_without_any_image_is_a_text_only_catalog_not_bad_input(tmp_path, capsys):
    """The 2018 fixture with every image field removed: one "text-only catalog" line, no per-item
    image_no_source records (a real text-only release has thousands)."""
    lines = []
    for line in (FIXTURES / "2018/meta.json").read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            lines.append(line)  # the fixture's malformed lines stay as they are
            continue
        for key in ("image", "imageURL", "imageURLHighRes"):
            record.pop(key, None)
        lines.append(json.dumps(record).encode())
    meta = tmp_path / "meta.json"
    meta.write_bytes(b"\n".join(lines) + b"\n")
    assert run_cli("amazon", "--reviews", FIXTURES / "2018/reviews.json", "--meta", meta, "--out", tmp_path,
                   "--dataset", "txt", "--kcore", "2", "--no-progress") == 0
    stats = load_stats(tmp_path / "txt", "txt")
    assert stats["images"]["text_only"] is True and stats["items_with_image"] == 0
    assert "image_no_source" not in stats["problems"]
    assert not [p for p in problems_of(tmp_path / "txt", "txt") if p["kind"].startswith("image")]
    assert "a text-only catalog" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ 2023

def test_2023_conversion_with_downloads(tmp_path, image_server):
    s = image_server
    s.add("/p1_hires.jpg", image_bytes("JPEG", (60, 60)))
    s.add("/p2_main_large.jpg", image_bytes("PNG", (30, 60)))
    s.add("/p3_large.jpg", image_bytes("JPEG", (64, 48)))
    meta = copy_with_host(FIXTURES / "2023/meta.jsonl", tmp_path / "meta.jsonl", s.base)
    reviews = FIXTURES / "2023/reviews.jsonl"
    assert run_cli("amazon", "--reviews", reviews, "--meta", meta, "--out", tmp_path, "--dataset", "fx2023",
                   "--kcore", "3", "--download-images", "--image-size", "24", "--no-progress") == 0
    d = tmp_path / "fx2023"
    stats = load_stats(d, "fx2023")
    assert stats["source"]["version"] == "2023"
    # 19 lines: 9 truncated, 12 timestamp null, 15 rating "five" -> 16 reviews.
    assert stats["source"]["reviews_read"] == 16
    assert filters_by_step(stats) == {
        "drop_items_without_meta": (1, 0, 1),   # W2-P404 (its meta line is truncated)
        "dedupe_user_item": (1, 0, 0),          # W1 bought two variants of P001
        "kcore": (2, 1, 0),                     # W5 (two reviews)
    }
    assert (stats["users"], stats["items"], stats["interactions"]) == (4, 4, 12)
    assert stats["problems"] == {"image_no_source": 1, "meta_malformed_line": 1, "review_bad_field": 1,
                                 "review_malformed_line": 1, "review_missing_field": 1}
    assert stats["images"]["counts"] == {"no_source": 1, "ok": 3}
    assert s.hits["/p2_pt01.jpg"] == 0                                   # the MAIN variant is used

    header, rows = read_rows(d / "fx2023.inter")
    # Milliseconds become seconds with three decimals; the earlier P001 variant review is kept.
    assert rows[:3] == [["W1", "P001", "5.0", "1672531200.123"], ["W1", "P002", "4.0", "1672617600.456"],
                        ["W1", "P003", "5.0", "1672790400.789"]]
    assert ["W4", "P004", "4.0", "1680480000.000"] in rows               # asin used when parent_asin is absent
    text = read_item_sidecar(d, "fx2023")
    assert text["P001"]["title"] == "Pok\u00e9mon & Friends \u2728 Glitter Gel"
    assert text["P001"]["description"] == "Shiny gel.\nHolographic\nCruelty free"
    assert text["P001"]["categories"] == ["All Beauty", "Beauty & Personal Care", "Makeup", "Body"]
    assert text["P003"]["brand"] == "From Details"
    assert text["P004"]["image"] is None


def test_2023_image_choice_in_both_layouts():
    # Raw files: a list of entries; the Hugging Face copy: a dict of lists. MAIN first, hi_res > large > thumb.
    listed = [{"thumb": "t1", "large": "l1", "variant": "PT01", "hi_res": "h1"},
              {"thumb": "t2", "large": "l2", "variant": "MAIN", "hi_res": None}]
    assert amazon._image_2023(listed) == "l2"
    columns = {"thumb": ["t1", "t2"], "large": ["l1", "l2"], "variant": ["PT01", "MAIN"], "hi_res": ["h1", None]}
    assert amazon._image_2023(columns) == "l2"
    assert amazon._image_2023([{"thumb": "t", "large": None, "hi_res": None}]) == "t"
    assert amazon._image_2023([]) is None and amazon._image_2023(None) is None


# -------------------------------------------------------------------------------- gzip, versions, errors

@pytest.mark.parametrize("release,reviews,meta", [("2014", "reviews.json", "meta.json"),
                                                  ("2018", "reviews.json", "meta.json"),
                                                  ("2023", "reviews.jsonl", "meta.jsonl")])
def test_gzipped_files_convert_identically(tmp_path, release, reviews, meta):
    paths = {}
    for name in (reviews, meta):
        gz = tmp_path / f"{name}.gz"
        gz.write_bytes(gzip.compress((FIXTURES / release / name).read_bytes()))
        paths[name] = gz
    common = ["--kcore", "2", "--no-progress"]
    assert run_cli("amazon", "--reviews", FIXTURES / release / reviews, "--meta", FIXTURES / release / meta,
                   "--out", tmp_path / "plain", "--dataset", "d", *common) == 0
    assert run_cli("amazon", "--reviews", paths[reviews], "--meta", paths[meta],
                   "--out", tmp_path / "gz", "--dataset", "d", *common) == 0
    for suffix in ("inter", "item", "text.jsonl"):
        assert (tmp_path / "plain/d" / f"d.{suffix}").read_bytes() == (tmp_path / "gz/d" / f"d.{suffix}").read_bytes()
    assert load_stats(tmp_path / "gz/d", "d")["problems"] == load_stats(tmp_path / "plain/d", "d")["problems"]


def test_parallel_chunked_reading_matches_serial(tmp_path, monkeypatch):
    # The fixture 20 times over, cut into ~700-byte chunks parsed by 2 worker processes: the same rows
    # and the same problems with the same line numbers as one in-process pass.
    big = tmp_path / "reviews.json"
    big.write_bytes((FIXTURES / "2014/reviews.json").read_bytes() * 20)
    serial_problems, parallel_problems = Problems(), Problems()
    serial = amazon.read_reviews(big, "2014", serial_problems, workers=1)
    monkeypatch.setattr(amazon, "_CHUNK_BYTES", 700)
    monkeypatch.setattr(amazon, "_PARALLEL_MIN_BYTES", 0)
    parallel = amazon.read_reviews(big, "2014", parallel_problems, workers=2)
    pd.testing.assert_frame_equal(serial, parallel)
    assert len(serial) == 20 * 20
    assert [str(p) for p in serial_problems.entries] == [str(p) for p in parallel_problems.entries]
    assert parallel_problems.entries[-1].where == f"{big}:{19 * 25 + 21}"


def test_version_detection():
    for release, reviews, meta in (("2014", "reviews.json", "meta.json"), ("2018", "reviews.json", "meta.json"),
                                   ("2023", "reviews.jsonl", "meta.jsonl")):
        assert amazon.detect_version(FIXTURES / release / reviews, FIXTURES / release / meta) == release
    with pytest.raises(FatalInputError, match="looks like 2023 reviews but .* 2018 metadata"):
        amazon.detect_version(FIXTURES / "2023/reviews.jsonl", FIXTURES / "2018/meta.json")


def test_exit_codes(tmp_path, capsys):
    # 1: missing file, release conflict, nothing left after filtering -- with no stats file written.
    assert run_cli("amazon", "--reviews", tmp_path / "nope.json", "--meta", FIXTURES / "2014/meta.json",
                   "--out", tmp_path, "--dataset", "x") == 1
    assert "nope.json: file not found" in capsys.readouterr().err
    assert run_cli("amazon", "--reviews", FIXTURES / "2023/reviews.jsonl", "--meta", FIXTURES / "2018/meta.json",
                   "--out", tmp_path, "--dataset", "x") == 1
    assert run_cli("amazon", "--reviews", FIXTURES / "2014/reviews.json", "--meta", FIXTURES / "2014/meta.json",
                   "--out", tmp_path, "--dataset", "x", "--kcore", "10", "--no-progress") == 1
    assert "no interactions left after filtering" in capsys.readouterr().err
    assert not (tmp_path / "x" / "x.stats.json").exists() and not (tmp_path / "x" / "x.inter").exists()
    # 2: usage errors (argparse), including --images-dir together with --download-images.
    with pytest.raises(SystemExit) as e:
        run_cli("amazon", "--reviews", "r", "--meta", "m", "--out", tmp_path, "--dataset", "x",
                "--images-dir", tmp_path, "--download-images")
    assert e.value.code == 2
    proc = subprocess.run([sys.executable, "-m", "dataset_tools.cli", "amazon", "--kcore", "-1"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: vlm2rec-data amazon" in proc.stderr


def test_sidecar_reader_reports_file_and_line(tmp_path):
    good = {"item_id": "A", "title": "t", "description": "", "categories": [], "brand": "", "image": None}
    cases = [
        ("{not json", "not valid JSON"),
        (json.dumps({**good, "title": 3}), "field 'title' must be str"),
        (json.dumps({k: v for k, v in good.items() if k != "brand"}), "field 'brand' is missing"),
        (json.dumps(good), "item 'A' already appeared on line 1"),
        (json.dumps({**good, "item_id": "B", "image": "../outside.jpg"}), "must be relative"),
        (json.dumps({**good, "item_id": "C", "image": "images/C.jpg"}), "does not exist"),
    ]
    for bad, message in cases:
        (tmp_path / "s.text.jsonl").write_text(json.dumps(good) + "\n" + bad + "\n", encoding="utf-8")
        with pytest.raises(SidecarError, match=message) as e:
            read_item_sidecar(tmp_path, "s")
        assert f"s.text.jsonl:2:" in str(e.value)
    with pytest.raises(SidecarError, match="not found"):
        read_item_sidecar(tmp_path, "missing")
    (tmp_path / "s.text.jsonl").write_text(json.dumps({**good, "image": "images/A.jpg"}) + "\n", encoding="utf-8")
    assert read_item_sidecar(tmp_path, "s", check_images=False)["A"]["image"] == "images/A.jpg"


def test_atomic_path_never_leaves_partial_files(tmp_path):
    target = tmp_path / "f.inter"
    target.write_text("old complete content")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half writ")
            raise RuntimeError("killed")
    assert target.read_text() == "old complete content" and [p.name for p in tmp_path.iterdir()] == ["f.inter"]


# ------------------------------------------------------------------------------- unreadable inputs

def _gzip_with_zlib_error(data: bytes) -> bytes:
    """``data`` gzipped, with the first single-byte change that makes the deflate stream invalid."""
    packed = gzip.compress(data, mtime=0)
    for k in range(20, len(packed) - 8):
        broken = bytearray(packed)
        broken[k] ^= 0xFF
        try:
            gzip.decompress(bytes(broken))
        except zlib.error:
            return bytes(broken)
        except (OSError, EOFError):
            continue
    raise AssertionError("no byte flip gives a zlib error")


def _gzip_with_bad_crc(data: bytes) -> bytes:
    packed = bytearray(gzip.compress(data, mtime=0))
    packed[-8] ^= 0xFF                       # the CRC32 of the trailer: every byte decodes, the check fails
    return bytes(packed)


@pytest.mark.parametrize("which,make,message", [
    ("reviews", lambda d: gzip.compress(d)[:len(gzip.compress(d)) // 2], "the gzip data ends early"),
    ("meta", lambda d: gzip.compress(d)[:len(gzip.compress(d)) // 2], "the gzip data ends early"),
    ("reviews", lambda d: random.Random(0).randbytes(3000), "named .gz but not gzip data"),
    ("meta", lambda d: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n", "named .gz but not gzip data"),
    ("reviews", _gzip_with_bad_crc, "corrupt gzip data (CRC check failed"),
    ("reviews", _gzip_with_zlib_error, "corrupt gzip data (Error -3"),
])
def test_unreadable_input_is_one_line_error_naming_the_file(tmp_path, capsys, which, make, message):
    files = {"reviews": FIXTURES / "2014/reviews.json", "meta": FIXTURES / "2014/meta.json"}
    broken = tmp_path / f"{which}.json.gz"
    broken.write_bytes(make(files[which].read_bytes() * 20))
    files[which] = broken
    out = tmp_path / "out"
    assert run_cli("amazon", "--reviews", files["reviews"], "--meta", files["meta"], "--out", out,
                   "--dataset", "x", "--kcore", "0", "--no-progress") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vlm2rec-data amazon: error: {broken}: {message}"), err
    assert not out.exists()                  # no empty DIR/NAME/ (nor DIR) left by the failed run


def test_html_page_saved_as_json_is_named(tmp_path, capsys):
    page = tmp_path / "meta.json"
    page.write_text("\n<html><head><title>Access denied</title></head></html>\n")
    assert run_cli("amazon", "--reviews", FIXTURES / "2014/reviews.json", "--meta", page, "--out", tmp_path / "o",
                   "--dataset", "x", "--no-progress") == 1
    assert f"{page}: looks like an HTML or XML page" in capsys.readouterr().err


@pytest.mark.parametrize("release,line,message", [
    ("2014", "{'asin': 'Z999', 'title': 'cut off in the middle", "not a complete Python literal"),
    ("2018", '{"asin": "Z999", "title": "cut off in the middle', "not valid JSON"),
])
def test_malformed_meta_line_of_an_item_without_reviews_is_reported(tmp_path, release, line, message):
    meta = tmp_path / "meta.json"
    lines = (FIXTURES / release / "meta.json").read_text(encoding="utf-8").splitlines()
    meta.write_text("\n".join(lines + [line, lines[0].replace("B001", "Z998").replace("C001", "Z998")]) + "\n",
                    encoding="utf-8")
    assert run_cli("amazon", "--reviews", FIXTURES / release / "reviews.json", "--meta", meta, "--out", tmp_path,
                   "--dataset", "m", "--kcore", "0", "--no-progress") == 0
    bad = [p for p in problems_of(tmp_path / "m", "m") if p["where"] == f"{meta}:{len(lines) + 1}"]
    assert len(bad) == 1 and bad[0]["kind"] == "meta_malformed_line"
    assert message in bad[0]["message"] and "Z999 has no reviews" in bad[0]["message"]
    # The well-formed record of another unreviewed item (last line) is skipped silently, as before.
    assert not [p for p in problems_of(tmp_path / "m", "m") if p["where"] == f"{meta}:{len(lines) + 2}"]


def test_item_missing_from_images_dir_is_listed_with_a_correct_message(tmp_path, images_2014, capsys):
    # kcore 0 keeps B005, whose image is not in the directory.
    assert run_cli("amazon", "--reviews", FIXTURES / "2014/reviews.json", "--meta", FIXTURES / "2014/meta.json",
                   "--out", tmp_path, "--dataset", "d", "--kcore", "0", "--images-dir", images_2014,
                   "--no-progress") == 0
    out = capsys.readouterr().out
    assert "pass --download-images or --images-dir" not in out
    stats = load_stats(tmp_path / "d", "d")
    assert stats["images"]["counts"] == {"corrupt": 1, "missing": 1, "ok": 3}     # was: not_fetched 1, unlisted
    missing = {p["where"]: p["message"] for p in problems_of(tmp_path / "d", "d") if p["kind"] == "image_missing"}
    assert missing["item B005"].startswith(f"not found in --images-dir {images_2014} as B005.<ext> or B005.jpg")


def test_failed_run_removes_only_the_empty_folders_it_created(tmp_path):
    args = ["--reviews", FIXTURES / "2014/reviews.json", "--meta", FIXTURES / "2014/meta.json", "--no-progress"]
    # A new DIR/NAME (and DIR) are removed again when nothing is left after filtering.
    assert run_cli("amazon", *args, "--out", tmp_path / "new" / "data", "--dataset", "x", "--kcore", "10") == 1
    assert not (tmp_path / "new").exists()
    # An existing output folder is kept, with its files, whatever happens.
    assert run_cli("amazon", *args, "--out", tmp_path, "--dataset", "old", "--kcore", "2") == 0
    before = sorted(p.name for p in (tmp_path / "old").iterdir())
    assert run_cli("amazon", *args, "--out", tmp_path, "--dataset", "old", "--kcore", "10") == 1
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [n for n in before if n != "old.stats.json"]
    # Images a failed run downloaded or copied are kept for the next run.
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "B001.jpg").write_bytes(image_bytes())
    assert run_cli("amazon", *args, "--out", tmp_path, "--dataset", "img", "--kcore", "2", "--images-dir", d,
                   "--require-image") == 1
    assert (tmp_path / "img" / "images" / "B001.jpg").is_file() and (tmp_path / "img" / "img.images.jsonl").is_file()


def test_outputs_get_the_permissions_open_would_give(tmp_path, images_2014):
    # Temporary-then-rename writing must not leave files at mkstemp's 0600 (a guard: atomic_path opens
    # its temporary names with open(), which already gives 0666 & ~umask).
    old = os.umask(0o027)
    try:
        assert run_cli("amazon", "--reviews", FIXTURES / "2014/reviews.json", "--meta", FIXTURES / "2014/meta.json",
                       "--out", tmp_path, "--dataset", "p", "--kcore", "3", "--images-dir", images_2014,
                       "--no-progress") == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "p").rglob("*") if p.is_file()]
    assert len(files) >= 9
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(0o640) for p in files}

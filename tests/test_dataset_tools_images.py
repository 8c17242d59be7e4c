"""Image store of vlm2rec-data: normalisation, downloads (404, 5xx, timeouts, corrupt bodies), the
resumable manifest, and an interrupted (killed) download that resumes without refetching.

All downloads go to a local HTTP server on 127.0.0.1 started by the ``image_server`` fixture
(tests/conftest.py); it stops at the end of each test.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from dataset_tools.images import ImageOptions, image_file_name, process_images, to_square_rgb
from dataset_tools.problems import Problems
from helpers import image_bytes

REPO = Path(__file__).resolve().parents[1]


def test_to_square_rgb_letterboxes_and_flattens_alpha():
    # A transparent PNG becomes white, not black; a 80x60 image is scaled to 32x24 and centred.
    img = to_square_rgb(image_bytes("PNG", (80, 60), "RGBA"), 32)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert img.getpixel((16, 16)) == (255, 255, 255)
    img = to_square_rgb(image_bytes("PNG", (80, 60), "RGB", (0, 0, 255)), 32)
    assert img.getpixel((16, 16)) == (0, 0, 255)
    assert img.getpixel((16, 1)) == (255, 255, 255)       # padding above the 32x24 picture
    assert to_square_rgb(image_bytes("PNG", (10, 10), "L"), 20).mode == "RGB"   # grayscale, upscaled
    with pytest.raises(OSError):
        to_square_rgb(b"\x89PNG garbage", 32)
    with pytest.raises(OSError):
        to_square_rgb(image_bytes("JPEG")[:200], 32)      # truncated JPEG: fails on full decode


def test_image_file_names_are_safe_and_distinct():
    assert image_file_name("B00ABC", "jpg") == "B00ABC.jpg"
    odd = [image_file_name(i, "png") for i in ("a/b", "a_b", ".hidden", "a b", "a:b")]
    assert len(set(odd)) == len(odd)
    assert all("/" not in n and not n.startswith(".") and n.endswith(".png") for n in odd)


def test_download_statuses_retries_and_rerun(tmp_path, image_server):
    s = image_server
    refs = {
        "ok": s.add("/ok.jpg", image_bytes()),
        "gone": s.add("/gone.jpg", b"", status=404),
        "flaky": s.add("/flaky.jpg", b"", status=503),
        "garbage": s.add("/garbage.jpg", b"<html>not an image</html>"),
        "slow": s.add("/slow.jpg", image_bytes(), delay=1.0),
        "none": None,
        "remote_refused": "ftp://example.invalid/x.jpg",
    }
    opts = ImageOptions(size=48, download=True, workers=4, timeout=0.3, retries=2, backoff=0.01, progress=False)
    problems = Problems()
    res = process_images(tmp_path, "t", refs, opts, problems)
    assert res.counts == {"corrupt": 1, "failed": 2, "missing": 2, "no_source": 1, "ok": 1}
    assert res.paths["ok"] == "images/ok.jpg" and res.paths["gone"] is None
    assert s.hits["/gone.jpg"] == 1                       # 404 is final: no retry
    assert s.hits["/flaky.jpg"] == 3                      # 503: 1 try + 2 retries
    assert s.hits["/slow.jpg"] == 3                       # timeouts are retried too
    with Image.open(tmp_path / "images" / "ok.jpg") as im:
        assert im.size == (48, 48) and im.mode == "RGB"
    manifest = {e["item_id"]: e for e in map(json.loads, (tmp_path / "t.images.jsonl").read_text().splitlines())}
    assert manifest["slow"]["error"].startswith("timed out") and manifest["slow"]["attempts"] == 3
    assert manifest["flaky"]["error"].startswith("HTTP 503")
    assert problems.counts == {"image_corrupt": 1, "image_download_failed": 2, "image_missing": 2,
                               "image_no_source": 1}
    assert all(p.where.startswith("item ") for p in problems.entries)

    # Rerun: ok and 404 are final, everything else is tried again (the server has recovered).
    s.add("/flaky.jpg", image_bytes())
    s.add("/slow.jpg", image_bytes())
    s.hits.clear()
    res = process_images(tmp_path, "t", refs, opts, Problems())
    assert res.resumed == 2 and res.counts["ok"] == 3
    assert s.hits["/ok.jpg"] == 0 and s.hits["/gone.jpg"] == 0
    assert s.hits["/flaky.jpg"] == 1 and s.hits["/garbage.jpg"] == 1
    # The manifest is compacted to one line per item at the end.
    assert len((tmp_path / "t.images.jsonl").read_text().splitlines()) == len(refs)


def test_remote_urls_are_not_fetched_without_download_flag(tmp_path, image_server):
    refs = {"a": image_server.add("/a.jpg", image_bytes())}
    res = process_images(tmp_path, "t", refs, ImageOptions(download=False, progress=False), Problems())
    assert res.counts == {"not_fetched": 1} and image_server.hits["/a.jpg"] == 0


def _write_catalog(directory, base_url, n):
    """A 2018-format catalog whose n items each have one image on the server."""
    with open(directory / "meta.json", "w") as f:
        for k in range(n):
            f.write(json.dumps({"asin": f"I{k:03d}", "title": f"Item {k}",
                                "imageURLHighRes": [f"{base_url}/img{k}.jpg"]}) + "\n")
    with open(directory / "reviews.json", "w") as f:
        for k in range(n):
            f.write(json.dumps({"reviewerID": f"U{k % 7}", "asin": f"I{k:03d}", "overall": 5.0,
                                "unixReviewTime": 1500000000 + k}) + "\n")


def test_killed_download_resumes_without_refetching(tmp_path, image_server):
    n = 40
    for k in range(n):
        image_server.add(f"/img{k}.jpg", image_bytes(color=(k * 5, 100, 50)), delay=0.15)
    _write_catalog(tmp_path, image_server.base, n)
    cmd = [sys.executable, "-m", "dataset_tools.cli", "amazon", "--reviews", str(tmp_path / "reviews.json"),
           "--meta", str(tmp_path / "meta.json"), "--out", str(tmp_path / "out"), "--dataset", "kill",
           "--kcore", "0", "--download-images", "--workers", "2", "--image-size", "32", "--no-progress"]
    manifest = tmp_path / "out" / "kill" / "kill.images.jsonl"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if manifest.exists() and manifest.read_text().count('"ok"') >= 6:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    dataset_dir = tmp_path / "out" / "kill"
    assert not (dataset_dir / "kill.stats.json").exists()          # incomplete runs have no stats file
    done = set()
    for line in manifest.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue                                                  # a line cut by the kill
        if entry["status"] == "ok":
            done.add(entry["item_id"])
    assert 6 <= len(done) < n
    for p in (dataset_dir / "images").iterdir():                      # no corrupt file under a final name
        if not p.name.startswith("."):
            with Image.open(p) as im:
                im.load()

    image_server.hits.clear()
    for k in range(n):
        image_server.add(f"/img{k}.jpg", image_bytes(color=(k * 5, 100, 50)))
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    refetched = {f"I{int(p[4:-4]):03d}" for p in image_server.hits}
    assert not refetched & done
    stats = json.loads((dataset_dir / "kill.stats.json").read_text())
    assert stats["images"]["counts"] == {"ok": n}
    assert stats["images"]["resumed"] == len(done)
    assert not [p for p in os.listdir(dataset_dir / "images") if p.startswith(".")]   # temporaries cleaned

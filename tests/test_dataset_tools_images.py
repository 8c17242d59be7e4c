"""Image store of vlm2rec-data: normalisation, downloads (404, 5xx, timeouts, corrupt bodies), the
resumable manifest, an interrupted (killed) download that resumes without refetching, the download
deadline against a server that trickles bytes, Ctrl-C during such a download, and --images-dir misses.

All downloads go to a local HTTP server on 127.0.0.1 started by the ``image_server`` or
``trickle_server`` fixture (tests/conftest.py); it stops at the end of each test.
"""
import json
import os
import signal
import socket
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


def test_download_deadline_cuts_off_trickling_and_stalled_servers(tmp_path, trickle_server):
    # "trickle" sends one byte per second, so the per-read timeout never fires; "stall" sends one byte
    # and then nothing for longer than the timeout, so only the deadline's watchdog can end it in time.
    s, body = trickle_server, image_bytes()
    refs = {"trickle": s.add("/trickle.jpg", body, interval=1.0), "stall": s.add("/stall.jpg", body, interval=30.0),
            "fast": s.add("/fast.jpg", body, interval=0)}
    opts = ImageOptions(size=32, download=True, workers=3, timeout=8.0, deadline=2.5, retries=3, backoff=0.01,
                        progress=False)
    problems = Problems()
    start = time.monotonic()
    res = process_images(tmp_path, "t", refs, opts, problems)
    assert time.monotonic() - start < 5.0
    assert res.counts == {"failed": 2, "ok": 1}
    assert s.hits["/trickle.jpg"] == 1 and s.hits["/stall.jpg"] == 1      # the deadline covers all tries
    manifest = {e["item_id"]: e for e in map(json.loads, (tmp_path / "t.images.jsonl").read_text().splitlines())}
    for item in ("trickle", "stall"):
        assert manifest[item]["status"] == "failed"
        assert "download deadline of 2.5 s passed during try 1" in manifest[item]["error"]
    assert {(p.kind, p.where) for p in problems.entries} == {("image_download_failed", "item trickle"),
                                                             ("image_download_failed", "item stall")}
    assert all("deadline" in p.message for p in problems.entries)
    assert not [p for p in os.listdir(tmp_path / "images") if p.startswith(".")]

    # A rerun against a server that has recovered fetches the failed ones again, and only those.
    s.add("/trickle.jpg", body, interval=0)
    s.add("/stall.jpg", body, interval=0)
    s.hits.clear()
    res = process_images(tmp_path, "t", refs, opts, Problems())
    assert res.counts == {"ok": 3} and res.resumed == 1
    assert dict(s.hits) == {"/trickle.jpg": 1, "/stall.jpg": 1}


def test_download_deadline_also_cuts_off_a_connect_that_hangs(tmp_path):
    # A listening socket whose accept queue is full: the kernel drops further SYNs, so connect() hangs.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.2)
        probe = socket.socket()
        probe.settimeout(0.5)
        fillers.append(probe)
        try:
            probe.connect(("127.0.0.1", port))
            pytest.skip("this kernel accepts connections beyond the listen backlog")
        except socket.timeout:
            pass
        opts = ImageOptions(size=32, download=True, timeout=10.0, deadline=1.0, retries=2, progress=False)
        start = time.monotonic()
        res = process_images(tmp_path, "t", {"x": f"http://127.0.0.1:{port}/x.jpg"}, opts, Problems())
        assert time.monotonic() - start < 3.0                 # not the 10 s connect timeout
        assert res.counts == {"failed": 1}
    finally:
        for s in fillers + [server]:
            s.close()


def test_ctrl_c_during_a_trickling_download_exits_at_once_and_resumes(tmp_path, trickle_server):
    n_fast, n_slow = 3, 2
    for k in range(n_fast + n_slow):
        trickle_server.add(f"/img{k}.jpg", image_bytes(color=(k * 5, 100, 50)), interval=1.0 if k >= n_fast else 0)
    _write_catalog(tmp_path, trickle_server.base, n_fast + n_slow)
    cmd = [sys.executable, "-m", "dataset_tools.cli", "amazon", "--reviews", str(tmp_path / "reviews.json"),
           "--meta", str(tmp_path / "meta.json"), "--out", str(tmp_path / "out"), "--dataset", "int",
           "--kcore", "0", "--download-images", "--workers", "8", "--timeout", "30", "--download-deadline", "60",
           "--image-size", "32", "--no-progress"]
    dataset_dir = tmp_path / "out" / "int"
    manifest = dataset_dir / "int.images.jsonl"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                manifest.exists() and manifest.read_text().count('"ok"') == n_fast
                and all(trickle_server.hits[f"/img{k}.jpg"] for k in range(n_fast, n_fast + n_slow))):
            time.sleep(0.05)
        time.sleep(0.5)                                   # the slow ones are now trickling
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, proc.stderr.read()
    assert took < 3.0                                     # before: waited for the trickles to end (~20 s)
    assert "interrupted" in proc.stderr.read()
    assert not (dataset_dir / "int.stats.json").exists()
    assert not [p for p in os.listdir(dataset_dir / "images") if p.startswith(".")]
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(e["item_id"] for e in entries) == [f"I{k:03d}" for k in range(n_fast)]   # only finished ones
    assert all(e["status"] == "ok" for e in entries)

    for k in range(n_fast, n_fast + n_slow):
        trickle_server.add(f"/img{k}.jpg", image_bytes(color=(k * 5, 100, 50)), interval=0)
    trickle_server.hits.clear()
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert set(trickle_server.hits) == {f"/img{k}.jpg" for k in range(n_fast, n_fast + n_slow)}
    stats = json.loads((dataset_dir / "int.stats.json").read_text())
    assert stats["images"]["counts"] == {"ok": n_fast + n_slow} and stats["images"]["resumed"] == n_fast


def test_images_dir_miss_is_reported_and_a_later_download_run_fetches_it(tmp_path, image_server):
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.jpg").write_bytes(image_bytes())
    refs = {"a": image_server.add("/a.jpg", image_bytes()), "b": image_server.add("/photos/b1.jpg", image_bytes())}
    problems = Problems()
    res = process_images(tmp_path, "t", refs, ImageOptions(images_dir=images, progress=False), problems)
    assert res.counts == {"missing": 1, "ok": 1} and image_server.hits["/photos/b1.jpg"] == 0
    [p] = problems.entries
    assert (p.kind, p.where) == ("image_missing", "item b")
    assert p.message.startswith(f"not found in --images-dir {images} as b.<ext> or b1.jpg")
    assert "pass --" not in p.message
    # Not a final HTTP error: a run with --download-images tries the URL.
    res = process_images(tmp_path, "t", refs, ImageOptions(download=True, progress=False), Problems())
    assert res.counts == {"ok": 2} and image_server.hits["/photos/b1.jpg"] == 1

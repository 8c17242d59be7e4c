"""Throughput of ``vlm2rec-data amazon``: the text part on a generated catalog, and the image download step.

    python benchmarks/convert_throughput.py [--interactions 1000000] [--images 2000] [--workers 8]

1. Text part: a catalog in the Amazon 2018 format (reviews as JSON lines with the release's usual
   fields and a short review text, about 290 bytes a line; the same reviews as the ratings-only CSV;
   metadata JSON lines) with ``--interactions`` reviews, Zipf-like item popularity, 3% repeated
   (user, item) reviews and 1% reviews of an item without metadata, converted with the 5-core and no
   image work (URLs recorded as not fetched). Each conversion runs in a fresh child process, timed
   from the call to ``convert_amazon`` to its return, with its CPU time (parsing processes included)
   and peak resident memory: JSON lines with one parsing process and with the default (one per core,
   at most 8), and the CSV. Targets: at least 200k interactions/s, at most 2 GB.
2. Image step: ``--images`` JPEGs (500x400, noise: incompressible like photos) served from memory by
   an HTTP server on 127.0.0.1 in another process; downloaded, decoded, resized to 224 px and stored
   by ``--workers`` threads.

Prints a markdown table. Nothing leaves the machine.
"""
from __future__ import annotations

import argparse
import http.server
import io
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset_tools.images import ImageOptions, process_images  # noqa: E402
from dataset_tools.problems import Problems  # noqa: E402

_WORDS = ("great product works well love it would buy again smells nice skin soft too small "
          "arrived quickly color perfect recommend").split()


def generate_catalog(directory: pathlib.Path, n_interactions: int, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """Write reviews.json and meta.json (Amazon 2018 format) with ``n_interactions`` review lines."""
    rng = np.random.default_rng(seed)
    n_users = max(10, n_interactions // 8)
    n_items = max(10, n_interactions // 30)
    users = rng.integers(0, n_users, n_interactions)
    items = np.minimum((rng.pareto(1.2, n_interactions) * n_items / 20).astype(np.int64), n_items - 1)
    dup = rng.random(n_interactions) < 0.03                       # re-reviews of an earlier pair
    items[dup] = np.roll(items, 1)[dup]
    users[dup] = np.roll(users, 1)[dup]
    items[rng.random(n_interactions) < 0.01] = n_items            # an item id with no metadata
    times = 1_300_000_000 + rng.integers(0, 200_000_000, n_interactions)
    ratings = rng.integers(1, 6, n_interactions)
    texts = [" ".join(rng.choice(_WORDS, 12)) for _ in range(997)]
    with open(directory / "ratings.csv", "w", encoding="utf-8") as f:     # the 2018 ratings-only file
        for k in range(n_interactions):
            f.write(f"B{items[k]:09d},A{users[k]:013d},{float(ratings[k])},{int(times[k])}\n")
    reviews = directory / "reviews.json"
    with open(reviews, "w", encoding="utf-8") as f:
        for k in range(n_interactions):
            f.write(json.dumps({
                "overall": float(ratings[k]), "verified": True, "reviewTime": "01 2, 2014",
                "reviewerID": f"A{users[k]:013d}", "asin": f"B{items[k]:09d}", "reviewerName": "Someone",
                "reviewText": texts[k % 997], "summary": "Five Stars", "unixReviewTime": int(times[k]),
            }) + "\n")
    meta = directory / "meta.json"
    with open(meta, "w", encoding="utf-8") as f:
        for i in range(n_items):
            f.write(json.dumps({
                "category": ["Beauty", "Skin Care", f"Kind {i % 40}"], "description": [texts[i % 997]],
                "title": f"Product {i} &amp; friends", "brand": f"Brand {i % 300}",
                "feature": ["Paraben free"], "rank": "12,345 in Beauty", "asin": f"B{i:09d}",
                "imageURL": [f"https://images.invalid/{i}_SS40_.jpg"],
                "imageURLHighRes": [f"https://images.invalid/{i}.jpg"],
            }) + "\n")
    return reviews, meta


_CHILD = """
import json, pathlib, resource, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from dataset_tools.convert import AmazonJob, convert_amazon
from dataset_tools.images import ImageOptions
t1 = time.perf_counter()
cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
res = convert_amazon(AmazonJob(reviews=pathlib.Path({reviews!r}), meta=pathlib.Path({meta!r}),
                               out=pathlib.Path({out!r}), dataset="bench", kcore=5, progress=False,
                               parse_workers={workers}, images=ImageOptions(download=False, progress=False)))
t2 = time.perf_counter()
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({{"import_s": t1 - t0, "convert_s": t2 - t1, "stats": res.stats, "maxrss_kb": me.ru_maxrss,
                   "cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime - cpu0}}))
"""


def bench_text(workdir: pathlib.Path, reviews: pathlib.Path, meta: pathlib.Path, workers: int) -> dict:
    """Convert in a fresh child process; its own peak RSS (parsing workers are separate processes,
    each holding one 8 MB chunk and its parsed rows)."""
    code = _CHILD.format(root=str(ROOT), reviews=str(reviews), meta=str(meta), out=str(workdir / "out"),
                         workers=workers)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _serve(directory: str, port_queue) -> None:
    blobs = {p.name: p.read_bytes() for p in pathlib.Path(directory).iterdir()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = blobs.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    server.serve_forever()


def bench_images(workdir: pathlib.Path, n: int, workers: int) -> dict:
    src = workdir / "served"
    src.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)
    for k in range(n):
        img = np.roll(base, k, axis=1)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=85)
        (src / f"{k}.jpg").write_bytes(buf.getvalue())
    queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_serve, args=(str(src), queue), daemon=True)
    server.start()
    try:
        port = queue.get(timeout=30)
        refs = {f"I{k:06d}": f"http://127.0.0.1:{port}/{k}.jpg" for k in range(n)}
        out = workdir / "imgout"
        out.mkdir()
        t = time.perf_counter()
        result = process_images(out, "bench", refs, ImageOptions(size=224, download=True, workers=workers,
                                                                 progress=False), Problems())
        seconds = time.perf_counter() - t
    finally:
        server.terminate()
        server.join()
    return {"seconds": seconds, "counts": result.counts, "mb": sum(p.stat().st_size for p in src.iterdir()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interactions", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=8, help="image download threads")
    args = ap.parse_args()
    from dataset_tools.amazon import default_workers
    parse_workers = default_workers()
    with tempfile.TemporaryDirectory(prefix="vlm2rec-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        reviews, meta = generate_catalog(tmp, args.interactions)
        reviews_mb = reviews.stat().st_size / 1e6
        runs = [(f"JSON lines, --jobs {w}", bench_text(tmp, reviews, meta, w)) for w in sorted({1, parse_workers})]
        runs.append(("ratings CSV", bench_text(tmp, tmp / "ratings.csv", meta, 1)))
        images = bench_images(tmp, args.images, args.workers)
    s = runs[0][1]["stats"]
    print(f"catalog: {args.interactions:,} review lines ({reviews_mb:.0f} MB, Amazon 2018 JSON lines), "
          f"{s['source']['reviews_read']:,} read; after filters {s['users']:,} users, {s['items']:,} items, "
          f"{s['interactions']:,} interactions; {os.cpu_count()} CPUs")
    print()
    print("| step | work | wall s | CPU s | throughput (wall) | peak memory (RSS) | target |")
    print("|---|---|---|---|---|---|---|")
    for label, text in runs:
        rate = args.interactions / text["convert_s"]
        rss_gb = text["maxrss_kb"] / 1e6
        ok = "met" if rate >= 200_000 and rss_gb <= 2 else "NOT met"
        print(f"| text part: read, filter, 5-core, write ({label}) | "
              f"{args.interactions:,} interactions | {text['convert_s']:.2f} | {text['cpu_s']:.2f} | "
              f"{rate:,.0f} interactions/s | {rss_gb:.2f} GB | >= 200k/s, <= 2 GB: {ok} |")
    print(f"| image step ({args.workers} threads, HTTP on 127.0.0.1) | {args.images:,} JPEGs "
          f"({images['mb']:.0f} MB, 500x400) -> 224 px | {images['seconds']:.2f} | - | "
          f"{args.images / images['seconds']:,.0f} images/s | - | statuses {images['counts']} |")


if __name__ == "__main__":
    main()

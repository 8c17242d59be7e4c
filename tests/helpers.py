"""Helpers shared by the tests: run the real command in a subprocess, locate fixtures."""
import collections
import http.server
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image

TESTS_DIR = Path(__file__).resolve().parent
FIXTURES = TESTS_DIR / "fixtures"
REPO_ROOT = TESTS_DIR.parent


def run_cli(args, cwd, env_extra=None, timeout=600, prelude=None):
    """Run ``python -m recbole_vlm2rec ARGS`` (the ``run_recbole`` command) and return the CompletedProcess.

    ``prelude`` is Python code run first in the child (e.g. importing a test-only plugin model).
    """
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    env.update(env_extra or {})
    code = "import sys, torch; torch.set_num_threads(1)\n"
    if prelude:
        code += prelude + "\n"
    code += "from recbole_vlm2rec.cli import main\nsys.exit(main())\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def vlm2rec_model_and_batch(data_path, dataset="tiny-mm", **overrides):
    """A VLM2Rec built as RecBole builds it, from ``fixtures/vlm2rec-tiny.yaml`` on ``data_path``, and the
    first training batch (the same model and batch in every process: seeded like a run)."""
    import recbole_vlm2rec  # noqa: F401  (registers the models and compat shims)
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_vlm2rec.models.vlm2rec import VLM2Rec

    config = Config(model="VLM2Rec", dataset=dataset, config_file_list=[str(FIXTURES / "vlm2rec-tiny.yaml")],
                    config_dict=dict(data_path=str(data_path), **overrides))
    init_seed(config["seed"], config["reproducibility"])
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = VLM2Rec(config, train_data._dataset)
    return model, next(iter(train_data))


def write_tiny_multimodal_dataset(root, name="tiny-mm", n_items=40, n_users=80, seed=0, with_images=True,
                                  with_text=True, broken_images=0):
    """A small multimodal dataset in the ``vlm2rec-data`` output format (atomic files + text sidecar + images).

    Items have a text attribute (a word in the title) and an image attribute (a drawn shape); each user
    keeps to one (word, shape) pair, so the next item is predictable from both. ``broken_images`` items
    point at a corrupt image file. Returns the dataset directory.
    """
    import json
    import random

    from PIL import ImageDraw

    rng = random.Random(seed)
    words, shapes = ["alpha", "bravo", "charlie", "delta"], ["square", "disc", "cross", "bar"]
    folder = Path(root) / name
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n_items):
        word, shape = words[i % 4], shapes[(i // 4) % 4]
        image = None
        if with_images:
            image = f"images/i{i}.png"
            if i < broken_images:
                (folder / image).write_bytes(b"not an image")
            else:
                picture = Image.new("RGB", (28, 28), tuple(rng.randrange(256) for _ in range(3)))
                draw = ImageDraw.Draw(picture)
                box = {"square": (6, 6, 22, 22), "disc": (4, 4, 24, 24), "cross": (12, 2, 16, 26), "bar": (2, 12, 26, 16)}
                (draw.ellipse if shape == "disc" else draw.rectangle)(box[shape], fill=(255, 255, 255))
                picture.save(folder / image)
        title = f"{word} item number {i}" if with_text else ""
        items.append({"item_id": f"i{i}", "title": title, "description": "", "categories": ["Demo"] if with_text else [],
                      "brand": "", "image": image, "_pair": (word, shape)})
    by_pair = {}
    for item in items:
        by_pair.setdefault(item["_pair"], []).append(item["item_id"])
    pairs = sorted(by_pair)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(n_users):
        pool = by_pair[pairs[u % len(pairs)]] + rng.sample([it["item_id"] for it in items], 2)
        sequence = rng.sample(pool, min(len(pool), rng.randint(4, 6)))
        for t, item_id in enumerate(sequence):
            inter.append(f"u{u}\t{item_id}\t5.0\t{u * 100 + t}.0")
    (folder / f"{name}.inter").write_text("\n".join(inter) + "\n")
    item_lines = ["item_id:token\tcategories:token_seq\tbrand:token\timage:token"]
    for item in items:
        item_lines.append(f"{item['item_id']}\t{' '.join(item['categories'])}\t\t{item['image'] or ''}")
    (folder / f"{name}.item").write_text("\n".join(item_lines) + "\n")
    with open(folder / f"{name}.text.jsonl", "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps({k: v for k, v in item.items() if not k.startswith("_")}) + "\n")
    return folder


def image_bytes(fmt="JPEG", size=(80, 60), mode="RGB", color=(200, 30, 30)):
    buf = io.BytesIO()
    if mode == "RGBA":
        color = color + (0,)          # fully transparent
    Image.new(mode, size, color if mode != "L" else 128).save(buf, format=fmt)
    return buf.getvalue()


class ImageServer:
    """A bounded HTTP server on 127.0.0.1; counts every request. A route has a status, a body, a delay
    before answering, and an ``interval``: 0 sends the body at once, > 0 one byte every ``interval``
    seconds after the headers (a trickling server: a client without a total deadline waits as long as it
    keeps sending), until ``give_up`` seconds have passed."""

    def __init__(self, give_up=20.0):
        self.routes = {}
        self.hits = collections.Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] += 1
                status, body, delay, interval = server.routes.get(self.path, (404, b"not found", 0.0, 0.0))
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if not interval:
                        self.wfile.write(body)
                        return
                    stop = time.monotonic() + give_up
                    for k in range(len(body)):
                        if time.monotonic() > stop:
                            break
                        self.wfile.write(body[k:k + 1])
                        self.wfile.flush()
                        time.sleep(interval)
                except OSError:
                    pass            # the client gave up (timeout and deadline tests)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path, body, status=200, delay=0.0, interval=0.0):
        self.routes[path] = (status, body, delay, interval)
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

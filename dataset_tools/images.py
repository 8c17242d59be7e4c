"""The local image store ``DIR/NAME/images/``: one RGB square image per item, from disk or downloaded.

Every image, wherever it comes from, is decoded in full with PIL (a truncated or garbage file fails
here, not in training), converted to RGB (transparent areas become white, as product photos expect),
scaled to fit ``size`` x ``size`` and centred on a white square, then written under a temporary name
and renamed, so that ``images/`` never holds a partial file.

Sources, tried in this order for each item:

1. ``--images-dir``: a file named ``<item_id>.<ext>`` or with the basename of the item's image URL.
2. A local reference in the metadata: a path (relative paths resolve against the metadata file's
   directory) or a ``file://`` URL. The synthetic catalogs use these.
3. An ``http(s)`` URL, fetched only with ``--download-images``: ``workers`` threads, ``timeout`` seconds
   to connect or for the next bytes, ``retries`` more tries after a timeout, connection error, HTTP 408,
   429 or 5xx, sleeping ``backoff * 2**try`` seconds (with jitter) in between; other 4xx (404, 410, 403)
   are final. ``deadline`` (``--download-deadline``, 60 s) bounds one image's download as a whole, all
   tries and pauses included: ``timeout`` alone would let a server that trickles a byte now and then hold
   a worker forever. An image past its deadline is cut off at once and counted ``failed``.

With ``--images-dir`` an item whose file is not there is ``missing`` (its reference, if any, is not
read or fetched), with the names that were looked for.

Interrupting (Ctrl-C): every download in progress is cut off at once (its socket is shut down, which
wakes a thread blocked in connect or recv, the deadline's mechanism too), queued items are cancelled,
and the items that finished meanwhile are still logged; the interrupted ones get no manifest entry and
leave no file, so a rerun does them again.

Resuming: ``NAME.images.jsonl`` (the manifest) gets one JSON line per finished item, appended right
after its file is in place: ``{"item_id", "source", "status", "file", "size", "error", "attempts"}``.
A rerun skips items whose last entry is ``ok`` (same source, size and format, file present) or a
final HTTP error (``missing`` after an HTTP try of the same URL), and retries everything else. At the
end the manifest is compacted to one line per item (items of earlier runs that this run did not need
included).
Statuses: ``ok``; ``no_source`` (the metadata names no image);
``not_fetched`` (a remote URL without ``--download-images`` or ``--images-dir``); ``missing`` (HTTP
404/410/other 4xx, file not found, not in ``--images-dir``); ``corrupt`` (not a decodable image);
``failed`` (timeouts or errors after all retries, or the download deadline passed).
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import json
import pathlib
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Optional

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from .atomic import atomic_path, remove_stale_temps, write_jsonl
from .downloads import Failure as _Failure, Watchdog as _Watchdog, download as _download
from .problems import Problems

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
_SWEEP_SECONDS = 0.2                   # how often the main thread cuts off downloads past their deadline
_PROBLEM_KIND = {"no_source": "image_no_source", "missing": "image_missing",
                 "corrupt": "image_corrupt", "failed": "image_download_failed"}


@dataclass
class ImageOptions:
    size: int = 224                       # side of the stored square images, in pixels
    fmt: str = "jpg"                      # "jpg" (RGB JPEG, quality 92) or "png" (lossless)
    images_dir: Optional[pathlib.Path] = None
    download: bool = False
    workers: int = 8
    timeout: float = 10.0                 # seconds to connect, or to wait for the next bytes
    deadline: float = 60.0                # seconds for one image's whole download, all tries included
    retries: int = 3
    backoff: float = 0.5
    base_dir: Optional[pathlib.Path] = None   # where relative local references resolve (metadata's dir)
    progress: bool = True


@dataclass
class ImageResult:
    paths: dict           # item_id -> "images/<file>" or None
    counts: dict          # status -> number of items
    resumed: int          # items taken from an earlier run's manifest without any work
    processed: int        # items read or downloaded in this run
    text_only: bool = False  # the metadata names no image for any item: a text-only catalog, not bad input


def image_file_name(item_id: str, fmt: str) -> str:
    """A file-system-safe, collision-free file name for an item's image."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", item_id)
    if safe != item_id or safe.startswith("."):
        safe = safe.lstrip(".") + "-" + hashlib.sha1(item_id.encode("utf-8")).hexdigest()[:10]
    return f"{safe}.{fmt}"


def to_square_rgb(data: bytes, size: int) -> Image.Image:
    """Decode image bytes (raises OSError/ValueError if they are not a complete image) into the store's form."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba, mask=rgba.getchannel("A"))
        else:
            rgb = im.convert("RGB")
    w, h = rgb.size
    if (w, h) == (size, size):
        return rgb
    scale = size / max(w, h)
    rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(rgb, ((size - rgb.width) // 2, (size - rgb.height) // 2))
    return canvas


def _is_remote(ref: str) -> bool:
    return ref[:8].lower().startswith(("http://", "https://"))


def _local_path(ref: str, base_dir: Optional[pathlib.Path]) -> Optional[pathlib.Path]:
    """The file a local reference names, or None if ``ref`` is a URL of another scheme."""
    parts = urllib.parse.urlsplit(ref)
    if parts.scheme == "file":
        return pathlib.Path(urllib.request.url2pathname(parts.path))
    if parts.scheme and len(parts.scheme) > 1:     # one letter: a Windows drive, i.e. a path
        return None
    path = pathlib.Path(ref)
    return path if path.is_absolute() or base_dir is None else base_dir / path


class _DirIndex:
    """Files of ``--images-dir`` by stem (item id) and by name (URL basename), listed once."""

    def __init__(self, directory: pathlib.Path):
        self.by_stem, self.by_name = {}, {}
        for p in sorted(directory.iterdir()):
            if p.suffix.lower() in IMAGE_EXTS and p.is_file():
                self.by_stem.setdefault(p.stem, p)
                self.by_name.setdefault(p.name, p)

    def find(self, item_id: str, ref: Optional[str]) -> Optional[pathlib.Path]:
        hit = self.by_stem.get(item_id)
        if hit is None and ref:
            hit = self.by_name.get(_url_name(ref))
        return hit


def _url_name(ref: str) -> str:
    return pathlib.PurePosixPath(urllib.parse.urlsplit(ref).path).name


def read_manifest(path: pathlib.Path) -> dict:
    """Last entry per item; unreadable lines (a run killed mid-write) are ignored."""
    entries = {}
    if path.is_file():
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    e = json.loads(line)
                    entries[e["item_id"]] = e
                except (ValueError, KeyError, TypeError):
                    continue
    return entries


def process_images(dataset_dir: pathlib.Path, name: str, refs: dict, opts: ImageOptions,
                   problems: Problems) -> ImageResult:
    """Fill ``dataset_dir/images`` for the items of ``refs`` (item_id -> image reference or None)."""
    images_dir = dataset_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(images_dir)
    manifest_path = dataset_dir / f"{name}.images.jsonl"
    previous = read_manifest(manifest_path)
    final, jobs = _plan(refs, previous, images_dir, opts)

    resumed = sum(1 for e in final.values() if e.get("resumed"))
    watchdog = _Watchdog()
    with open(manifest_path, "a", encoding="utf-8") as log, \
            concurrent.futures.ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool, \
            tqdm(total=len(jobs), desc="images", unit="img", disable=not opts.progress or not jobs) as bar:

        def record(entry: dict) -> None:
            log.write(json.dumps(entry, ensure_ascii=False) + "\n")
            log.flush()
            final[entry["item_id"]] = entry
            bar.update(1)

        pending: set = set()
        try:
            pending = {pool.submit(_one_image, job, images_dir, opts, watchdog) for job in jobs}
            while pending:
                done, _ = concurrent.futures.wait(pending, timeout=_SWEEP_SECONDS,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                watchdog.sweep()
                for fut in done:
                    record(fut.result())
                    pending.discard(fut)
        except BaseException:
            # Ctrl-C (or an error): cut off every download now rather than wait for them, drop the queue,
            # and log what finished meanwhile so that a rerun skips it.
            watchdog.halt()
            pool.shutdown(wait=True, cancel_futures=True)
            for fut in pending:
                if not fut.cancelled() and fut.exception() is None:
                    record(fut.result())
            raise

    # A catalog whose metadata names no image at all (e.g. a text-only release) is text-only: one fact for the
    # stats and the summary, not one "bad input" record per item.
    text_only = bool(final) and not opts.images_dir and all(e["status"] == "no_source" for e in final.values())
    for item_id in sorted(final):
        e = final[item_id]
        if e["status"] in _PROBLEM_KIND and not text_only:
            where = f"item {item_id}"
            note = " (recorded by an earlier run)" if e.get("resumed") else ""
            problems.add(_PROBLEM_KIND[e["status"]], where,
                         f"{e['error']}{note}" + (f"; source {e['source']}" if e["source"] else ""))
    # Entries of items not asked for this time (e.g. a stricter k-core) stay: a later run may want them.
    kept = {**previous, **final}
    write_jsonl(manifest_path, ({k: v for k, v in kept[i].items() if k != "resumed"} for i in sorted(kept)))
    counts = collections.Counter(e["status"] for e in final.values())
    paths = {i: (f"images/{e['file']}" if e["status"] == "ok" else None) for i, e in final.items()}
    return ImageResult(paths, dict(sorted(counts.items())), resumed, len(jobs), text_only)


def _plan(refs: dict, previous: dict, images_dir: pathlib.Path, opts: ImageOptions):
    """Split the items into ``final`` (manifest entries settled without work: resumed, no source, not
    fetched, not in ``--images-dir``) and ``jobs`` (items to read or download)."""
    index = _DirIndex(opts.images_dir) if opts.images_dir else None
    final: dict = {}
    jobs = []
    for item_id in sorted(refs):
        ref = refs[item_id]
        local = index.find(item_id, ref) if index else None
        source = str(local) if local else ref
        file_name = image_file_name(item_id, opts.fmt)
        old = previous.get(item_id)
        if old and old.get("source") == source and (
                (old.get("status") == "ok" and old.get("size") == opts.size and old.get("file") == file_name
                 and (images_dir / file_name).is_file())
                or (old.get("status") == "missing" and _is_remote(source) and old.get("attempts", 0) > 0)):
            final[item_id] = dict(old, resumed=True)
        elif index and local is None and source and _is_remote(source) and not opts.download:
            final[item_id] = _entry(item_id, source, "missing", None, opts,
                                    f"not found in --images-dir {opts.images_dir} as {item_id}.<ext> or "
                                    f"{_url_name(source)}")
        elif source is None:
            final[item_id] = _entry(item_id, None, "no_source", None, opts, "the metadata names no image")
        elif local is None and _is_remote(source) and not opts.download:
            final[item_id] = _entry(item_id, source, "not_fetched", None, opts, "remote URL; pass --download-images")
        else:
            jobs.append((item_id, source, local, file_name))
    return final, jobs


def _entry(item_id, source, status, file_name, opts, error=None, attempts=0) -> dict:
    return {"item_id": item_id, "source": source, "status": status, "file": file_name,
            "size": opts.size, "error": error, "attempts": attempts}


def _one_image(job, images_dir: pathlib.Path, opts: ImageOptions, watchdog: _Watchdog) -> dict:
    """Read or download one image, verify, normalise and store it; never raises for bad input (only
    _Stopped, on Ctrl-C)."""
    item_id, source, local, file_name = job
    attempts = 0
    try:
        if local is None and _is_remote(source):
            data, attempts = _download(source, opts, watchdog)
        else:
            path = local or _local_path(source, opts.base_dir)
            if path is None:
                raise _Failure("missing", f"unsupported image reference {source!r}")
            try:
                data = path.read_bytes()
            except OSError as e:
                raise _Failure("missing", f"cannot read {path}: {e.strerror or e}") from None
        try:
            image = to_square_rgb(data, opts.size)
        except UnidentifiedImageError:
            raise _Failure("corrupt", f"not an image file ({len(data)} bytes of unknown format)", attempts) from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise _Failure("corrupt", f"not a decodable image ({type(e).__name__}: {e})", attempts) from None
        with atomic_path(images_dir / file_name) as tmp:
            if opts.fmt == "png":
                image.save(tmp, format="PNG", optimize=False)
            else:
                image.save(tmp, format="JPEG", quality=92)
        return _entry(item_id, source, "ok", file_name, opts, None, attempts)
    except _Failure as f:
        return _entry(item_id, source, f.status, None, opts, f.error, max(f.attempts, attempts))

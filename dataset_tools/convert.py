"""The Amazon conversion pipeline: raw reviews + metadata -> ``DIR/NAME/`` (atomic files, images, stats).

Order of work (each filter is recorded in ``NAME.stats.json["filters"]``):

1. read reviews (bad lines reported and skipped), detect the release unless given;
2. read metadata for the reviewed items only; drop interactions of items without metadata;
3. dedupe (user, item) keeping the earliest; optional minimum rating; iterative k-core;
4. images for the surviving items (resumable, see :mod:`dataset_tools.images`); with
   ``require_image``, drop items without a usable image and run the k-core again;
5. write ``NAME.inter``, ``NAME.item``, ``NAME.text.jsonl``, ``NAME.problems.jsonl`` and last
   ``NAME.stats.json``. The stats file is deleted when a run starts and written when it ends, so its
   presence means the directory holds one complete conversion.

A run that fails (or is interrupted) and created ``DIR/NAME/`` itself removes it again, with the
folders above it that it created, as long as they hold nothing but empty files and folders: no empty
folder is left behind, and downloaded images (and anything older) are kept for the next run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
from dataclasses import dataclass, field
from typing import Optional

from . import amazon, preprocess
from .atomic import SIDECAR_SUFFIX, remove_stale_temps, write_inter, write_item, write_item_sidecar, write_json, write_jsonl
from .images import ImageOptions, process_images
from .problems import FatalInputError, Problems

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class AmazonJob:
    reviews: pathlib.Path
    meta: pathlib.Path
    out: pathlib.Path
    dataset: str
    version: str = "auto"                  # "auto", "2014", "2018" or "2023"
    kcore: int = 5                         # 0 or 1: no k-core filtering
    min_rating: Optional[float] = None
    require_image: bool = False
    images: ImageOptions = field(default_factory=ImageOptions)
    progress: bool = True
    parse_workers: Optional[int] = None    # processes parsing a large reviews file (None: one per core, max 8)
    source_extra: dict = field(default_factory=dict)   # merged into stats["source"] (e.g. synthetic seed)


@dataclass
class Result:
    dataset_dir: pathlib.Path
    stats: dict
    problems: Problems


def check_dataset_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise FatalInputError(f"dataset name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a "
                              f"directory and the prefix of RecBole's files)")


def prepare_dataset_dir(out: pathlib.Path, name: str) -> pathlib.Path:
    """Create ``out/name``, remove temporaries of killed runs, and mark it incomplete until stats exist."""
    check_dataset_name(name)
    dataset_dir = pathlib.Path(out) / name
    dataset_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dataset_dir)
    (dataset_dir / f"{name}.stats.json").unlink(missing_ok=True)
    return dataset_dir


@contextlib.contextmanager
def output_dir(out: pathlib.Path, name: str):
    """:func:`prepare_dataset_dir` for the body of a ``with``; on failure, what it created is removed if empty."""
    check_dataset_name(name)
    target = pathlib.Path(out) / name
    created = [p for p in (target, *target.parents) if not p.exists()]     # deepest first
    dataset_dir = prepare_dataset_dir(out, name)
    try:
        yield dataset_dir
    except BaseException:
        if created:
            _remove_if_empty(created)
        raise


def _remove_if_empty(created: list) -> None:
    """Remove the folders of ``created`` (deepest first, the dataset folder first) that hold nothing but
    empty files and folders; os.rmdir refuses any that still holds something."""
    for root, _, files in os.walk(created[0], topdown=False):
        for f in files:
            path = pathlib.Path(root, f)
            if path.stat().st_size == 0:
                path.unlink()
        with contextlib.suppress(OSError):
            os.rmdir(root)
    for d in created[1:]:
        with contextlib.suppress(OSError):
            os.rmdir(d)


def convert_amazon(job: AmazonJob) -> Result:
    """Run the whole conversion; bad records go to the returned problems, fatal ones raise FatalInputError."""
    if job.images.images_dir is not None and not pathlib.Path(job.images.images_dir).is_dir():
        raise FatalInputError(f"--images-dir {job.images.images_dir}: not a directory")
    for path in (job.reviews, job.meta):
        if not pathlib.Path(path).is_file():
            raise FatalInputError(f"{path}: file not found")
    with output_dir(job.out, job.dataset) as dataset_dir:
        return _convert_amazon(job, dataset_dir)


def _convert_amazon(job: AmazonJob, dataset_dir: pathlib.Path) -> Result:
    problems = Problems()
    detected = job.version == "auto"
    version = amazon.detect_version(job.reviews, job.meta) if detected else job.version
    frame = amazon.read_reviews(job.reviews, version, problems, progress=job.progress, workers=job.parse_workers)
    if frame.empty:
        raise FatalInputError(f"{job.reviews}: no usable reviews ({len(problems)} bad lines; first: "
                              f"{problems.entries[0] if problems.entries else 'the file is empty'})")
    reviews_read = len(frame)
    meta = amazon.read_meta(job.meta, version, set(preprocess.present(frame, "item")), problems,
                            progress=job.progress)

    filters = []
    frame, rec = preprocess.keep_items(frame, meta.keys(), "drop_items_without_meta")
    filters.append(rec)
    frame, rec = preprocess.dedupe_user_item(frame)
    filters.append(rec)
    if job.min_rating is not None:
        frame, rec = preprocess.min_rating(frame, job.min_rating)
        filters.append(rec)
    if job.kcore > 1:
        frame, rec = preprocess.kcore(frame, job.kcore)
        filters.append(rec)
    _require_rows(frame, filters, job)

    # Images only for the items that survived: a category's metadata lists far more items than a k-core
    # keeps. With require_image, the counts in the stats cover these items, before that filter.
    image_opts = dataclasses.replace(job.images, base_dir=pathlib.Path(job.meta).resolve().parent,
                                     progress=job.progress)
    refs = {i: meta[i].image_ref for i in preprocess.present(frame, "item")}
    images = process_images(dataset_dir, job.dataset, refs, image_opts, problems)
    if job.require_image:
        with_image = {i for i, p in images.paths.items() if p}
        frame, rec = preprocess.keep_items(frame, with_image, "require_image")
        filters.append(rec)
        if job.kcore > 1:
            frame, rec = preprocess.kcore(frame, job.kcore)
            filters.append(rec)
        _require_rows(frame, filters, job)

    frame = preprocess.sort_by_user_time(frame)
    records = [sidecar_record(meta[i], images.paths[i]) for i in sorted(preprocess.present(frame, "item"))]
    source = {"kind": "amazon", "version": version, "version_detected": detected,
              "reviews": str(job.reviews), "meta": str(job.meta), "reviews_read": reviews_read,
              **job.source_extra}
    options = {"kcore": job.kcore, "min_rating": job.min_rating, "require_image": job.require_image,
               "images_dir": str(job.images.images_dir) if job.images.images_dir else None,
               "download_images": job.images.download}
    stats = write_dataset(dataset_dir, job.dataset, frame, records, problems, source, filters, options,
                          images={"counts": images.counts, "resumed": images.resumed,
                                  "processed": images.processed, "size": job.images.size,
                                  "format": job.images.fmt, "text_only": images.text_only})
    return Result(dataset_dir, stats, problems)


def _require_rows(frame, filters, job: AmazonJob) -> None:
    if frame.empty:
        steps = ", ".join(f"{r['step']} -{r['removed_interactions']}" for r in filters)
        raise FatalInputError(f"no interactions left after filtering {job.reviews} ({steps}); "
                              f"lower --kcore or --min-rating, or check that reviews and metadata match")


def sidecar_record(item: amazon.ItemMeta, image: Optional[str]) -> dict:
    """The text sidecar's record of one item (the one place its fields are laid out)."""
    return {"item_id": item.item_id, "title": item.title, "description": item.description,
            "categories": item.categories, "brand": item.brand, "image": image}


def write_dataset(dataset_dir: pathlib.Path, name: str, frame, records: Optional[list], problems: Problems,
                  source: dict, filters: list, options: dict, images: Optional[dict] = None) -> dict:
    """Write every output of a conversion; ``NAME.stats.json`` last. Returns the stats.

    ``records`` are sidecar records (None for interaction-only datasets: no ``.item``, no sidecar).
    """
    write_inter(dataset_dir / f"{name}.inter", frame)
    stats = {"dataset": name, "source": source, **preprocess.summary_counts(frame)}
    files = {"inter": f"{name}.inter"}
    if records is not None:
        write_item(dataset_dir / f"{name}.item", records)
        write_item_sidecar(dataset_dir, name, records)
        n = len(records) or 1
        with_text = sum(1 for r in records if r["title"] or r["description"])
        with_image = sum(1 for r in records if r["image"])
        stats.update({"items_with_text": with_text, "share_items_with_text": with_text / n,
                      "items_with_image": with_image, "share_items_with_image": with_image / n})
        files.update({"item": f"{name}.item", "text": f"{name}{SIDECAR_SUFFIX}"})
    if images is not None:
        stats["images"] = images
        files["images_manifest"] = f"{name}.images.jsonl"
    write_jsonl(dataset_dir / f"{name}.problems.jsonl", (p.as_dict() for p in problems.entries))
    files["problems"] = f"{name}.problems.jsonl"
    stats.update({"filters": filters, "problems": dict(sorted(problems.counts.items())),
                  "options": options, "files": files})
    write_json(dataset_dir / f"{name}.stats.json", stats)
    return stats


def format_summary(result: Result) -> str:
    """The human summary printed after a conversion."""
    s = result.stats
    src = s["source"]
    origin = {"amazon": f"Amazon {src.get('version')} reviews + metadata",
              "synthetic": "synthetic catalog (Amazon 2023 format)",
              "sequences": "per-user item sequences"}.get(src["kind"], src["kind"])
    lines = [f"wrote {result.dataset_dir} from {origin}",
             f"  users {s['users']:,}   items {s['items']:,}   interactions {s['interactions']:,}   "
             f"density {s['density']:.5f}   mean length {s['mean_sequence_length']:.2f}"]
    if "share_items_with_text" in s:
        lines.append(f"  items with text {s['share_items_with_text']:.1%}   "
                     f"items with image {s['share_items_with_image']:.1%}")
    if s["filters"]:
        lines.append("  filters:")
        for r in s["filters"]:
            extra = ", ".join(f"{k}={v}" for k, v in r.items()
                              if k not in ("step", "removed_interactions", "removed_users", "removed_items",
                                           "interactions_left"))
            lines.append(f"    {r['step']:<26} -{r['removed_interactions']:,} interactions, "
                         f"-{r['removed_users']:,} users, -{r['removed_items']:,} items"
                         + (f" ({extra})" if extra else ""))
    if "images" in s:
        im = s["images"]
        counts = ", ".join(f"{k} {v:,}" for k, v in im["counts"].items()) or "none"
        if im.get("text_only"):
            lines.append("  images: none, a text-only catalog (the metadata names no image for any item); "
                         "VLM2Rec and VLM2RecSASRec then use the text alone")
        else:
            lines.append(f"  images ({im['size']} px {im['format']}): {counts} "
                         f"(from earlier run {im['resumed']:,}, processed now {im['processed']:,})")
        if im["counts"].get("not_fetched"):
            lines.append("    some items have remote image URLs: pass --download-images or --images-dir")
    total = sum(s["problems"].values())
    if total:
        kinds = ", ".join(f"{k} {v:,}" for k, v in s["problems"].items())
        lines.append(f"  bad input: {total:,} ({kinds}); all listed in {s['files']['problems']}")
    else:
        lines.append("  bad input: none")
    return "\n".join(lines)

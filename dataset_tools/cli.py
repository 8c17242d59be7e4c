"""``vlm2rec-data``: build RecBole datasets (atomic files + item text + images) for recbole-vlm2rec.

Subcommands: ``amazon`` (raw Amazon 2014/2018/2023 reviews + metadata), ``synthetic`` (a generated
multimodal catalog with planted signal), ``demo`` (the small offline ``vlm2rec-demo`` dataset),
``from-sequences`` (per-user ordered item lists, optionally with item metadata) and ``features`` (item features
of a converted dataset from frozen pretrained text/image encoders, ``recbole_vlm2rec.data.frozen_features``).

Exit codes:
  0    the dataset was written (bad records, if any, were skipped, counted and listed; see the summary);
  1    the conversion could not be done: a missing or unreadable file (truncated or corrupt gzip, not
       gzip although named .gz, an HTML page), an undetectable release, nothing left after filtering, a
       write error; one line names the file and what to do; no half-written file, no NAME.stats.json
       and no empty DIR/NAME/ is left (a rerun resumes the image downloads);
  2    wrong command-line usage (argparse's message);
  130  interrupted (Ctrl-C): downloads in progress are cut off at once, finished images are kept and a
       rerun resumes.
``features`` exits 1 on data it cannot use (no dataset, a bad sidecar) and 2 on bad settings (an unknown
text field, weights that cannot be found: the message says how to get them, a missing ``features`` extra).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Optional, Sequence

from .amazon import VERSIONS
from .convert import AmazonJob, Result, convert_amazon, format_summary
from .demo import DEMO_NAME, ensure_demo_dataset
from .images import ImageOptions
from .problems import FatalInputError, Problems
from .sequences import convert_sequences
from .synthetic import (IMAGE_COLOURS, PATTERNS, THEMES, SyntheticSpec, attribute_ceilings, build_synthetic,
                        oracle_hit_rates)

EXIT_OK, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 130   # 2 (usage) is argparse's own exit


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _signal(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _add_image_options(p: argparse.ArgumentParser, default_size: int, default_format: str) -> None:
    p.add_argument("--image-size", type=_positive_int, default=default_size, metavar="PX",
                   help=f"side of the stored square RGB images (default {default_size})")
    p.add_argument("--image-format", choices=("jpg", "png"), default=default_format,
                   help=f"stored image format (default {default_format})")


def build_parser() -> argparse.ArgumentParser:
    # Long but flat: one add_argument per option of the four subcommands, in the order --help shows them.
    parser = argparse.ArgumentParser(
        prog="vlm2rec-data",
        description="Build RecBole datasets with item text and images for recbole-vlm2rec. Output: "
                    "DIR/NAME/{NAME.inter, NAME.item, NAME.text.jsonl, images/, NAME.stats.json, "
                    "NAME.problems.jsonl}.",
        epilog="Exit codes: 0 written (bad records skipped and listed), 1 cannot convert (message says why), "
               "2 usage error, 130 interrupted (rerun resumes).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("amazon", help="convert Amazon 2014/2018/2023 reviews + metadata",
                       description="Convert raw Amazon reviews and item metadata (json/jsonl, gzipped or not; "
                                   "2014 Python-literal metadata; ratings CSV) into RecBole atomic files, the "
                                   "item text sidecar and a local image store. Items without metadata are "
                                   "dropped, (user, item) pairs deduplicated (earliest kept), then an iterative "
                                   "k-core is applied. Reruns resume image downloads.")
    p.add_argument("--reviews", type=pathlib.Path, required=True, metavar="FILE", help="reviews or ratings file")
    p.add_argument("--meta", type=pathlib.Path, required=True, metavar="FILE", help="item metadata file")
    p.add_argument("--out", type=pathlib.Path, required=True, metavar="DIR",
                   help="data path; the dataset is written to DIR/NAME/")
    p.add_argument("--dataset", required=True, metavar="NAME", help="dataset name (RecBole's --dataset)")
    p.add_argument("--version", choices=("auto",) + VERSIONS, default="auto",
                   help="Amazon release of the files (default: detected from their keys)")
    p.add_argument("--kcore", type=_non_negative_int, default=5, metavar="K",
                   help="keep users and items with at least K interactions, iteratively (default 5; 0 = off)")
    p.add_argument("--min-rating", type=float, default=None, metavar="R",
                   help="drop interactions rated below R (and those without a rating)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images-dir", type=pathlib.Path, default=None, metavar="DIR",
                     help="take images from DIR (files named <item_id>.<ext> or like the URL's file name)")
    src.add_argument("--download-images", action="store_true",
                     help="download http(s) image URLs (resumable; see --workers, --timeout, --retries, "
                          "--download-deadline)")
    _add_image_options(p, 224, "jpg")
    p.add_argument("--require-image", action="store_true",
                   help="drop items without a usable image (then the k-core is applied again)")
    p.add_argument("--workers", type=_positive_int, default=8, metavar="N", help="download/decode threads (default 8)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for a connection or the next bytes (default 10)")
    p.add_argument("--download-deadline", type=_positive_float, default=60.0, metavar="S",
                   help="give up on an image after S seconds of downloading, all tries included; it counts "
                        "as failed and a rerun tries again (default 60)")
    p.add_argument("--retries", type=_non_negative_int, default=3, metavar="N",
                   help="extra tries after timeouts, connection errors, HTTP 408/429/5xx (default 3)")
    p.add_argument("--backoff", type=float, default=0.5, metavar="S",
                   help="first wait between tries, doubled each time (default 0.5)")
    p.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                   help="processes parsing a large reviews file (default: one per core, at most 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("synthetic", help="generate a multimodal catalog with planted signal, then convert it",
                       description="Write a deterministic catalog in the Amazon 2023 raw format (DIR/NAME/raw/: "
                                   "reviews.jsonl, meta.jsonl, images/) and convert it like `amazon`. Item titles "
                                   "reveal one latent attribute (a scent theme), images another (a pattern drawn "
                                   "under random colours); users' next items depend on both. The latent "
                                   "attributes are stored in NAME.latent.json only.")
    p.add_argument("--out", type=pathlib.Path, required=True, metavar="DIR", help="data path (DIR/NAME/)")
    p.add_argument("--dataset", required=True, metavar="NAME", help="dataset name")
    p.add_argument("--seed", type=int, required=True, help="random seed; same seed, same bytes")
    p.add_argument("--items", type=_positive_int, default=400, help="catalog size (default 400)")
    p.add_argument("--users", type=_positive_int, default=1000, help="number of users (default 1000)")
    p.add_argument("--text-signal", type=_signal, default=1.0, metavar="X",
                   help="how strongly the next item follows the text attribute, 0..1 (default 1)")
    p.add_argument("--image-signal", type=_signal, default=1.0, metavar="Y",
                   help="how strongly the next item follows the image attribute, 0..1 (default 1)")
    p.add_argument("--text-values", type=_positive_int, default=SyntheticSpec.text_values, metavar="N",
                   help=f"how many scent themes are planted, 1..{len(THEMES)} (default {SyntheticSpec.text_values})")
    p.add_argument("--image-values", type=_positive_int, default=SyntheticSpec.image_values, metavar="N",
                   help=f"how many image patterns are planted, 1..{len(PATTERNS)} "
                        f"(default {SyntheticSpec.image_values})")
    p.add_argument("--image-colours", choices=IMAGE_COLOURS, default="random",
                   help="random: both colours of a pattern random (which is darker is a coin flip); "
                        "dark-on-light: the pattern always darker than its background (default random)")
    p.add_argument("--kcore", type=_non_negative_int, default=5, metavar="K", help="k-core (default 5)")
    _add_image_options(p, 128, "png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("demo", help="build the small offline dataset vlm2rec-demo",
                       description="Build DIR/vlm2rec-demo (360 items, 1000 users, 64 px images) in seconds on "
                                   "CPU; nothing is done if it is already there. run_recbole does this itself "
                                   "when --dataset=vlm2rec-demo is missing from its data path.")
    p.add_argument("--out", type=pathlib.Path, required=True, metavar="DIR", help="data path")

    p = sub.add_parser("from-sequences", help="convert per-user ordered item lists",
                       description='Convert a JSON object {"<user>": [<item>, ...], ...} (each list in time '
                                   'order) into NAME.inter with timestamps 1, 2, 3, ... per user; with --items, '
                                   'also the text sidecar and NAME.item from the item metadata beside them.')
    p.add_argument("--input", type=pathlib.Path, required=True, metavar="FILE", help="JSON file")
    p.add_argument("--out", type=pathlib.Path, required=True, metavar="DIR", help="data path (DIR/NAME/)")
    p.add_argument("--dataset", required=True, metavar="NAME", help="dataset name")
    p.add_argument("--kcore", type=_non_negative_int, default=0, metavar="K",
                   help="iterative k-core (default 0: keep the sequences as given)")
    p.add_argument("--items", type=pathlib.Path, default=None, metavar="ITEMS.json",
                   help='item metadata {"<item>": {"title", "description", "brand", "categories"}}: also '
                        "write the text sidecar and NAME.item, as the amazon command does")

    p = sub.add_parser("features", help="item features from frozen pretrained text/image encoders",
                       description="Encode the items of a converted dataset with a sentence-transformers text "
                                   "encoder and/or a CLIP/SigLIP image encoder and write them in the item-embedding "
                                   "format (PREFIX.text.npy, PREFIX.image.npy + .json sidecars), which "
                                   "VLM2RecSASRec reads with --feature_prefix=PREFIX. Items without text or image "
                                   "get zero rows marked absent (counted). Offline: weights are a local directory "
                                   'or already in the Hugging Face cache (pip install ".[features]").')
    p.add_argument("--data", type=pathlib.Path, required=True, metavar="DIR", help="data path (DIR/NAME/)")
    p.add_argument("--dataset", required=True, metavar="NAME", help="dataset name")
    p.add_argument("--text-encoder", default=None, metavar="ID_OR_PATH",
                   help="sentence-transformers model id or directory (e.g. sentence-transformers/all-MiniLM-L6-v2)")
    p.add_argument("--image-encoder", default=None, metavar="ID_OR_PATH",
                   help="transformers CLIP or SigLIP model id or directory (e.g. openai/clip-vit-base-patch32)")
    p.add_argument("--text-fields", default=None, metavar="F1,F2",
                   help="comma-separated sidecar fields composed into an item's text, in order (default: all of "
                        "them, the description last so that it is what a too-long text loses)")
    p.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="items per forward (default 64)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--out", default=None, metavar="PREFIX",
                   help="output prefix (default DIR/NAME/features/NAME: writes NAME.text.npy, ...)")
    p.add_argument("--allow-download", action="store_true", help="download weights from the hub if not cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "amazon":
        job = AmazonJob(reviews=args.reviews, meta=args.meta, out=args.out, dataset=args.dataset,
                        version=args.version, kcore=args.kcore, min_rating=args.min_rating,
                        require_image=args.require_image, progress=not args.no_progress, parse_workers=args.jobs,
                        images=ImageOptions(size=args.image_size, fmt=args.image_format,
                                            images_dir=args.images_dir, download=args.download_images,
                                            workers=args.workers, timeout=args.timeout,
                                            deadline=args.download_deadline, retries=args.retries,
                                            backoff=args.backoff))
        result = convert_amazon(job)
    elif args.command == "synthetic":
        spec = SyntheticSpec(seed=args.seed, items=args.items, users=args.users, text_signal=args.text_signal,
                             image_signal=args.image_signal, image_size=args.image_size,
                             text_values=args.text_values, image_values=args.image_values,
                             image_colours=args.image_colours)
        try:
            spec.check()
        except ValueError as e:
            parser.error(f"synthetic: {e}")      # exits with status 2
        result = build_synthetic(args.out, args.dataset, spec, kcore=args.kcore, image_format=args.image_format,
                                 progress=not args.no_progress)
    elif args.command == "demo":
        dataset_dir = ensure_demo_dataset(args.out)
        stats = json.loads((dataset_dir / f"{DEMO_NAME}.stats.json").read_text(encoding="utf-8"))
        result = Result(dataset_dir, stats, Problems())
    elif args.command == "features":
        _features(parser, args)
        return
    else:
        result = convert_sequences(args.input, args.out, args.dataset, kcore=args.kcore, items_path=args.items)
    for line in result.problems.summary_lines():
        print(line, file=sys.stderr)
    print(format_summary(result))
    if result.stats["source"]["kind"] == "synthetic":
        rates = oracle_hit_rates(result.dataset_dir, result.stats["dataset"])
        print("  planted signal, Hit@10 of oracles that know the latent attributes: "
              + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
        ceilings = attribute_ceilings(result.dataset_dir, result.stats["dataset"])["test"]
        print("  attribute ceilings, expected test NDCG@10 without a popularity tie-break: "
              + ", ".join(f"{k} {v['ndcg@10']:.4f}" for k, v in ceilings.items()))


def _features(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # The encoders are recbole_vlm2rec's (this face may import it; the converters above never do).
    import logging

    from recbole_vlm2rec.data.frozen_features import write_item_features
    from recbole_vlm2rec.errors import ConfigError, DataError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fields = [f.strip() for f in args.text_fields.split(",") if f.strip()] if args.text_fields else None
    try:
        summary = write_item_features(str(args.data), args.dataset, args.text_encoder, args.image_encoder, fields,
                                      args.batch_size, args.device, args.out, args.allow_download,
                                      progress=not args.no_progress)
    except DataError as e:
        raise FatalInputError(str(e)) from None
    except ConfigError as e:
        parser.error(f"features: {e}")  # exits with status 2
    print(f"wrote item features {summary['prefix']}.{{{','.join(summary['paths'])}}}.npy; use "
          f"--feature_prefix={summary['prefix']} with VLM2RecSASRec")
    for modality, counts in summary["modalities"].items():
        print(f"  {modality}: {counts['items'] - counts['absent']:,} of {counts['items']:,} items, "
              f"{counts['absent']:,} absent (zero rows, marked in the sidecar)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _run(parser, args)
    except FatalInputError as e:
        print(f"vlm2rec-data {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FATAL
    except OSError as e:
        print(f"vlm2rec-data {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print(f"vlm2rec-data {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

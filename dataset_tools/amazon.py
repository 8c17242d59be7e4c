"""Readers for the three Amazon review releases (2014, 2018, 2023): reviews and item metadata.

The releases differ in keys, types and even syntax (docs/design.md#amazon-releases):

=======  ==================================================  ==========================================
release  reviews (JSON lines, or ratings CSV)                metadata (one record per line)
=======  ==================================================  ==========================================
2014     reviewerID, asin, overall, unixReviewTime (s);      Python literals: asin, title, description,
         CSV ``user,item,rating,time``                       categories [[...]], brand, imUrl
2018     reviewerID, asin, overall, unixReviewTime (s);      JSON: asin, title, description [], feature
         CSV ``item,user,rating,time``                       [], category [], brand, imageURL[HighRes] []
2023     user_id, asin, parent_asin, rating, timestamp (ms); JSON: parent_asin, title, description [],
         CSV with header ``user_id,parent_asin,...``         features [], categories [], store, images []
=======  ==================================================  ==========================================

Files may be gzipped (detected from their first bytes; a file named ``.gz`` must be gzip data). A file
that cannot be read as a whole (truncated or corrupt gzip data, a read error, an HTML page or one JSON
array instead of JSON lines) is a :class:`~dataset_tools.problems.FatalInputError` naming the file. Every
line is parsed on its own: a bad line is reported with ``file:line`` in
:class:`~dataset_tools.problems.Problems` and skipped (in metadata, the lines of items without reviews
too, although they are not extracted).
Timestamps are returned in seconds for every release. Item text is returned exactly, with HTML entities
unescaped; a release's description paragraphs and feature bullets are joined with newlines.

Why one module of ~650 lines: every function here encodes a difference between the releases (their keys,
types, syntax and file layouts, the table above); kept together, the table and the code that follows it
can be checked against each other in one read.
"""
from __future__ import annotations

import ast
import collections
import concurrent.futures
import contextlib
import csv
import functools
import gzip
import html
import io
import itertools
import json
import json.scanner
import os
import pathlib
import re
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional

import numpy as np
import pandas as pd
from tqdm import tqdm

from .atomic import as_token
from .preprocess import interactions_frame
from .problems import FatalInputError, Problems

VERSIONS = ("2014", "2018", "2023")

# Review keys per release: user, item, fallback item, rating, time, seconds per time unit.
_REVIEW_KEYS = {
    "2014": ("reviewerID", "asin", None, "overall", "unixReviewTime", 1.0),
    "2018": ("reviewerID", "asin", None, "overall", "unixReviewTime", 1.0),
    # 2023 items are keyed by parent_asin (variants share one page); asin is the fallback.
    "2023": ("user_id", "parent_asin", "asin", "rating", "timestamp", 1000.0),
}
# Keys that identify a release in a metadata record (checked in this order: 2023 meta has
# "categories" too, 2014 meta is the only one written as Python literals).
_META_MARKERS = (
    ("2023", {"parent_asin"}),
    ("2018", {"imageURL", "imageURLHighRes", "category", "feature", "main_cat", "also_buy", "also_view"}),
    ("2014", {"imUrl", "categories", "salesRank", "related"}),
)
_SNIFF_LINES = 50


@dataclass
class ItemMeta:
    """One item's metadata, normalised across releases (exact strings, entities unescaped)."""
    item_id: str
    title: str
    description: str
    categories: list
    brand: str
    image_ref: Optional[str]   # URL or local path of the main image, as given in the metadata


# ----------------------------------------------------------------------------------------------- files

def open_binary(path: os.PathLike | str) -> BinaryIO:
    """Open a plain or gzipped file for reading bytes; a missing file is a fatal input error."""
    if _is_gzipped(path):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


@contextlib.contextmanager
def _reading(path: os.PathLike | str) -> Iterator[BinaryIO]:
    """:func:`open_binary` for a ``with`` block whose read errors become one FatalInputError naming the file."""
    try:
        with open_binary(path) as f:
            yield f
    except EOFError:
        raise FatalInputError(f"{path}: the gzip data ends early (a truncated file, e.g. an unfinished "
                              f"download); download it again") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise FatalInputError(f"{path}: corrupt gzip data ({e}); download it again") from None
    except OSError as e:
        raise FatalInputError(f"{path}: cannot read it ({e.strerror or e})") from None


def _is_gzipped(path: os.PathLike | str) -> bool:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FatalInputError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:2] == b"\x1f\x8b":
        return True
    if path.suffix.lower() == ".gz":
        raise FatalInputError(f"{path}: named .gz but not gzip data (it starts with {head[:16]!r}; an error page "
                              f"saved by a failed download?); download it again")
    return False


def _check_start(path, head: bytes) -> None:
    """Reject, by their first bytes, inputs that would otherwise fail line by line with a misleading message."""
    head = head.lstrip()
    if head.startswith(b"["):
        raise FatalInputError(f"{path}: looks like one JSON array; the Amazon files are one record "
                              f"per line (convert with: jq -c '.[]' FILE > FILE.jsonl)")
    if head.startswith(b"<"):
        raise FatalInputError(f"{path}: looks like an HTML or XML page ({head[:40]!r}), not Amazon reviews "
                              f"or metadata; an error page saved by a failed download? Download it again")


def _numbered_lines(path: os.PathLike | str, progress: bool = False) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers; a UTF-8 byte-order mark on line 1 is dropped.

    With ``progress``, a tqdm bar counts lines on a terminal (never in logs: ``disable=None``).
    """
    with _reading(path) as f:
        first, lineno = f.readline().removeprefix(b"\xef\xbb\xbf"), 1
        while first.isspace():
            first, lineno = f.readline(), lineno + 1
        if not first:
            return
        _check_start(path, first)
        numbered = itertools.chain([(lineno, first)], enumerate(f, lineno + 1))
        if progress:
            numbered = tqdm(numbered, desc=pathlib.Path(path).name, unit=" lines", disable=None, mininterval=0.5)
        for lineno, line in numbered:
            if not line.isspace():
                yield lineno, line


def _looks_like_csv(path: os.PathLike | str) -> bool:
    for _, line in _numbered_lines(path):
        return not line.lstrip().startswith(b"{")
    return False


def _parse_record(raw: bytes):
    """A JSON object, or (2014 metadata) a Python literal dict. Raises ValueError if it is neither."""
    try:
        return json.loads(raw)
    except ValueError:
        if not raw.lstrip().startswith(b"{'"):
            raise
    try:
        return ast.literal_eval(raw.decode("utf-8"))
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise ValueError(f"Python literal: {getattr(e, 'msg', e)}") from None


# ------------------------------------------------------------------------------------- version sniffing

def _sniff_meta(path) -> Optional[str]:
    for n, (_, raw) in enumerate(_numbered_lines(path)):
        if n >= _SNIFF_LINES:
            break
        try:
            rec = _parse_record(raw)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if raw.lstrip().startswith(b"{'"):
            return "2014"   # Python-literal metadata exists only in the 2014 release
        for version, markers in _META_MARKERS:
            if markers & rec.keys():
                return version
    return None


def _sniff_reviews(path) -> Optional[str]:
    """"2023", "2014/2018" (identical review formats) or None."""
    if _looks_like_csv(path):
        for _, raw in _numbered_lines(path):
            return "2023" if b"parent_asin" in raw else "2014/2018"
    for n, (_, raw) in enumerate(_numbered_lines(path)):
        if n >= _SNIFF_LINES:
            break
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            if "parent_asin" in rec or "user_id" in rec:
                return "2023"
            if "reviewerID" in rec:
                return "2014/2018"
    return None


def detect_version(reviews_path, meta_path) -> str:
    """The release of a reviews/metadata pair, from the keys of their first records."""
    meta_v = _sniff_meta(meta_path)
    reviews_v = _sniff_reviews(reviews_path)
    if meta_v is None and reviews_v == "2023":
        return "2023"
    if meta_v is None:
        raise FatalInputError(f"{meta_path}: cannot tell which Amazon release this metadata is from (no known "
                              f"keys in its first {_SNIFF_LINES} records); pass --version 2014, 2018 or 2023")
    if reviews_v is not None and meta_v not in reviews_v:
        raise FatalInputError(f"{reviews_path} looks like {reviews_v} reviews but {meta_path} looks like "
                              f"{meta_v} metadata; pass files of one release, or force one with --version")
    return meta_v


# ------------------------------------------------------------------------------------------------ reviews

_CHUNK_BYTES = 8 << 20
# Below this size a file is parsed in-process: starting worker processes would cost more than it saves.
_PARALLEL_MIN_BYTES = 48 << 20


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def read_reviews(path, version: str, problems: Problems, progress: bool = False,
                 workers: Optional[int] = None) -> pd.DataFrame:
    """Interactions as a frame ``user, item, rating, timestamp`` (seconds), in file order (see
    :func:`dataset_tools.preprocess.interactions_frame`).

    A line that is not JSON, lacks the user, item or time, or has a non-numeric rating or time is
    reported and skipped. A missing rating is kept as NaN (sequential models do not need it).
    Large files are parsed by ``workers`` processes (default: one per core, at most 8), in chunks of
    whole lines; results and problems come back in file order.
    """
    if _looks_like_csv(path):
        return _read_reviews_csv(path, version, problems)
    workers = workers or default_workers()
    size = pathlib.Path(path).stat().st_size
    gzipped = _is_gzipped(path)
    parallel = workers > 1 and size * (4 if gzipped else 1) >= _PARALLEL_MIN_BYTES
    parse = functools.partial(_parse_review_chunk, str(path), version)
    users, items, ratings, times = [], [], [], []
    with tqdm(total=None if gzipped else size, desc=pathlib.Path(path).name, unit="B", unit_scale=True,
              disable=None if progress else True, mininterval=0.5) as bar:
        if parallel:
            results = _ordered_parallel_map(parse, _chunks(path), workers)
        else:
            results = (parse(first, chunk) for first, chunk in _chunks(path))
        for n_bytes, (u, i, r, t, bad) in results:
            users += u
            items += i
            ratings += r
            times += t
            for kind, where, message in bad:
                problems.add(kind, where, message)
            bar.update(n_bytes)
    scale = _REVIEW_KEYS[version][-1]
    return interactions_frame(users, items, np.asarray(times, dtype=np.float64) / scale, _ratings(ratings))


def _chunks(path) -> Iterator[tuple[int, bytes]]:
    """The file as blocks of whole lines, each with the number of its first line."""
    with _reading(path) as f:
        lineno, rest = 1, b""
        first = True
        while True:
            block = f.read(_CHUNK_BYTES)
            if first:
                block = block.removeprefix(b"\xef\xbb\xbf")
                _check_start(path, block)
                first = False
            if not block:
                if rest:
                    yield lineno, rest
                return
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest = block
                continue
            chunk, rest = block[:cut], block[cut:]
            yield lineno, chunk
            lineno += chunk.count(b"\n")


def _ordered_parallel_map(fn, chunks: Iterator[tuple[int, bytes]], workers: int):
    """``fn(first, chunk)`` over chunks in worker processes, in order, with few chunks in flight
    (Pool.imap would read the whole file into its queue)."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        pending = collections.deque()
        for first, chunk in chunks:
            pending.append(pool.submit(fn, first, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _parse_review_chunk(path: str, version: str, first: int, chunk: bytes):
    """Parse the review lines of one chunk: (bytes, users, items, ratings, times, problems as tuples)."""
    ukey, ikey, ikey2, rkey, tkey, _ = _REVIEW_KEYS[version]
    users, items, ratings, times = [], [], [], []
    problems = Problems()
    # The C scanner behind json.loads, called directly: json.loads spends more time detecting the
    # encoding and matching whitespace around the value than parsing a review line. Lines it rejects
    # go through json.loads again for the exact error message.
    scan = json.scanner.make_scanner(json.JSONDecoder())
    for lineno, raw in enumerate(chunk.split(b"\n"), first):
        if not raw or raw.isspace():
            continue
        try:
            s = raw.decode()
            rec, end = scan(s, 0)
            if end != len(s) and not s[end:].isspace():
                rec = None
        except (ValueError, StopIteration):
            rec = None
        if rec.__class__ is not dict:
            rec = _parse_object_slowly(raw, f"{path}:{lineno}", "review_malformed_line", problems)
            if rec is None:
                continue
        u = rec.get(ukey)
        i = rec.get(ikey) or (rec.get(ikey2) if ikey2 else None)
        r = rec.get(rkey)
        t = rec.get(tkey)
        # Fast path: the types every well-formed release line has. Anything else goes through checks.
        if not (u.__class__ is str and i.__class__ is str and t.__class__ in (int, float)
                and (r is None or r.__class__ in (int, float))):
            checked = _check_review(u, i, r, t, (ukey, ikey, rkey, tkey), f"{path}:{lineno}", problems)
            if checked is None:
                continue
            u, i, r, t = checked
        users.append(u)
        items.append(i)
        ratings.append(r)
        times.append(t)
    bad = [(p.kind, p.where, p.message) for p in problems.entries]
    return len(chunk), (users, items, ratings, times, bad)


def _ratings(values: list) -> np.ndarray:
    return np.array([np.nan if r is None else r for r in values], dtype=np.float64)


def _parse_object_slowly(raw: bytes, where: str, kind: str, problems: Problems) -> Optional[dict]:
    """json.loads with error reporting: the parsed object, or None after adding a problem."""
    try:
        rec = json.loads(raw)
    except ValueError as e:
        problems.add(kind, where, f"not valid JSON ({e})")
        return None
    if not isinstance(rec, dict):
        problems.add(kind, where, f"not a JSON object ({type(rec).__name__})")
        return None
    return rec


def _check_review(u, i, r, t, keys, where, problems):
    """Coerce a review's values (ids as strings, numbers from strings) or report why it is unusable."""
    ukey, ikey, rkey, tkey = keys
    for value, key in ((u, ukey), (i, ikey), (t, tkey)):
        if value is None or value == "":
            problems.add("review_missing_field", where, f"field {key!r} is missing or empty; review skipped")
            return None
    for value, key in ((u, ukey), (i, ikey)):
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            problems.add("review_bad_field", where, f"field {key!r} must be a string, got {value!r}; review skipped")
            return None
    try:
        t = float(t)
        r = None if r is None or r == "" else float(r)
    except (TypeError, ValueError):
        problems.add("review_bad_field", where, f"{rkey!r} or {tkey!r} is not a number ({r!r}, {t!r}); "
                                                f"review skipped")
        return None
    return str(u), str(i), r, t


_CSV_COLUMNS = {
    "user": ("user_id", "reviewerid", "user"),
    "item": ("parent_asin", "asin", "item_id", "item"),
    "rating": ("rating", "overall"),
    "time": ("timestamp", "unixreviewtime", "time"),
}


def _read_reviews_csv(path, version: str, problems: Problems) -> pd.DataFrame:
    """Ratings-only CSV: 2014 ``user,item,rating,time``, 2018 ``item,user,rating,time`` (no header),
    2023 (or any file with a header row) by column names."""
    *_, scale = _REVIEW_KEYS[version]
    users, items, ratings, times = [], [], [], []
    with _reading(path) as fb:
        text = io.TextIOWrapper(fb, encoding="utf-8", errors="strict", newline="")
        reader = csv.reader(text)
        pu, pi, pr, pt = (0, 1, 2, 3) if version == "2014" else (1, 0, 2, 3)
        last = 3
        try:
            for row in reader:
                lineno = reader.line_num
                if not row:
                    continue
                if lineno == 1 and any(c.strip().lower() in _CSV_COLUMNS["rating"] for c in row):
                    header = [c.strip().lower() for c in row]
                    try:
                        positions = tuple(next(header.index(n) for n in names if n in header)
                                          for names in _CSV_COLUMNS.values())
                    except StopIteration:
                        raise FatalInputError(f"{path}:1: CSV header {row} lacks one of the columns "
                                              f"{[names[0] for names in _CSV_COLUMNS.values()]}") from None
                    pu, pi, pr, pt = positions
                    last = max(positions)
                    continue
                if len(row) <= last:
                    problems.add("review_malformed_line", f"{path}:{lineno}",
                                 f"expected at least {last + 1} comma-separated fields, got {len(row)}")
                    continue
                u, i, r, t = row[pu].strip(), row[pi].strip(), row[pr].strip(), row[pt].strip()
                try:                                   # fast path: ids present, numbers parse
                    if u and i:
                        t = float(t)
                        r = float(r) if r else None
                        users.append(u)
                        items.append(i)
                        ratings.append(r)
                        times.append(t)
                        continue
                except ValueError:
                    pass
                checked = _check_review(u, i, r, t, ("user", "item", "rating", "time"), f"{path}:{lineno}",
                                        problems)
                if checked is not None:
                    users.append(checked[0])
                    items.append(checked[1])
                    ratings.append(checked[2])
                    times.append(checked[3])
        except UnicodeDecodeError as e:
            raise FatalInputError(f"{path}: not UTF-8 text near line {reader.line_num + 1} ({e})") from None
    # The 2023 CSV stores milliseconds like its JSON; positional CSVs are the 2014/2018 seconds ones.
    return interactions_frame(users, items, np.asarray(times, dtype=np.float64) / scale, _ratings(ratings))


# --------------------------------------------------------------------------------------------- metadata

_META_KEY = {"2014": "asin", "2018": "asin", "2023": "parent_asin"}


def read_meta(path, version: str, wanted: Optional[set], problems: Problems,
              progress: bool = False) -> dict[str, ItemMeta]:
    """Item metadata by item id; with ``wanted``, only those items (others are checked, not extracted).

    Full Amazon metadata files hold every item of a category, most of them never reviewed in a
    k-core subset. A line whose item id a cheap regex finds and which is not wanted is only checked:
    fully with ``json.loads`` (fast), or, for 2014 Python literals, with :func:`_literal_looks_whole`
    (``ast.literal_eval`` of every line would cost ten times as much); a broken one is reported like any
    other. Every other line is parsed in full.
    """
    key = _META_KEY[version]
    key_re = re.compile(rb"""['"]""" + key.encode() + rb"""['"]\s*:\s*['"]([^'"\\]+)['"]""")
    extract = _EXTRACTORS[version]
    meta: dict[str, ItemMeta] = {}
    first_seen: dict[str, int] = {}
    for lineno, raw in _numbered_lines(path, progress):
        where = f"{path}:{lineno}"
        if wanted is not None:
            hits = key_re.findall(raw)
            if len(hits) == 1 and as_token(hits[0].decode("utf-8", "replace")) not in wanted:
                error = _unwanted_line_error(raw)
                if error:
                    problems.add("meta_malformed_line", where, f"{error}; its item "
                                 f"{hits[0].decode('utf-8', 'replace')} has no reviews anyway")
                continue
        try:
            rec = _parse_record(raw)
        except ValueError as e:
            problems.add("meta_malformed_line", where, f"unreadable record ({e})")
            continue
        if not isinstance(rec, dict):
            problems.add("meta_malformed_line", where, f"not an object ({type(rec).__name__})")
            continue
        item_id = rec.get(key)
        if not isinstance(item_id, str) or not item_id.strip():
            problems.add("meta_missing_key", where, f"field {key!r} is missing, empty or not a string "
                                                    f"({item_id!r}); record skipped")
            continue
        item_id = as_token(item_id)
        if wanted is not None and item_id not in wanted:
            continue
        if item_id in meta:
            problems.add("meta_duplicate_item", where,
                         f"item {item_id} already described on line {first_seen[item_id]}; first kept")
            continue
        item = extract(item_id, rec, where, problems)
        if not item.title:
            problems.add("meta_missing_title", where, f"item {item_id} has no title (kept)")
        meta[item_id] = item
        first_seen[item_id] = lineno
    return meta


# A Python string literal (as repr() writes them: no prefixes, no raw newlines) and what else may stand
# in a 2014 record once its strings are gone: numbers, True/False/None, brackets, ':' and ','.
_PY_STRING = re.compile(rb"""'[^'\\\n]*(?:\\.[^'\\\n]*)*'|"[^"\\\n]*(?:\\.[^"\\\n]*)*\"""")
_PY_SKELETON = re.compile(rb"\{[\s\w.+\-{}\[\]():,]*\}")


def _literal_looks_whole(raw: bytes) -> bool:
    """A cheap stand-in for ``ast.literal_eval`` of a 2014 record: valid UTF-8, every string closed, only
    literal tokens outside strings, balanced brackets. It catches cut-off and garbled lines, not all errors."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    rest = _PY_STRING.sub(b"0", raw.strip())
    return (_PY_SKELETON.fullmatch(rest) is not None
            and all(rest.count(a) == rest.count(b) for a, b in ((b"{", b"}"), (b"[", b"]"), (b"(", b")"))))


def _unwanted_line_error(raw: bytes) -> Optional[str]:
    """Why a metadata line that is not extracted is broken, or None."""
    if raw.lstrip().startswith(b"{'"):
        return None if _literal_looks_whole(raw) else "unreadable record (not a complete Python literal)"
    try:
        rec = json.loads(raw)
    except ValueError as e:
        return f"unreadable record (not valid JSON: {e})"
    return None if isinstance(rec, dict) else f"not an object ({type(rec).__name__})"


def _clean(text: str) -> str:
    text = text.strip()
    return html.unescape(text).strip() if "&" in text else text


def _text(value, field: str, where: str, problems: Problems) -> list:
    """A text field as a list of non-empty cleaned strings (str, list of str, or missing)."""
    if value is None:
        return []
    values = [value] if value.__class__ is str else value
    if values.__class__ is not list or not all(v.__class__ is str for v in values):
        problems.add("meta_bad_field", where, f"field {field!r} should be text or a list of text, "
                                              f"got {str(value)[:60]!r}; ignored")
        return []
    out = []
    for v in values:
        v = _clean(v)
        if v:
            out.append(v)
    return out


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def _first_str(value) -> Optional[str]:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, list):
        for v in value:
            if isinstance(v, str) and v.strip():
                return v.strip()
    return None


def _extract_2014(item_id, rec, where, problems) -> ItemMeta:
    cats = rec.get("categories")
    flat = []
    if isinstance(cats, list):   # a list of category paths, e.g. [["Beauty", "Makeup", "Face"]]
        for path in cats:
            flat += _text(path, "categories", where, problems)
    elif cats is not None:
        problems.add("meta_bad_field", where, "field 'categories' should be a list of lists; ignored")
    return ItemMeta(item_id,
                    " ".join(_text(rec.get("title"), "title", where, problems)),
                    "\n".join(_text(rec.get("description"), "description", where, problems)),
                    _unique(flat),
                    " ".join(_text(rec.get("brand"), "brand", where, problems)),
                    _first_str(rec.get("imUrl")))


def _extract_2018(item_id, rec, where, problems) -> ItemMeta:
    desc = _text(rec.get("description"), "description", where, problems)
    desc += _text(rec.get("feature"), "feature", where, problems)
    return ItemMeta(item_id,
                    " ".join(_text(rec.get("title"), "title", where, problems)),
                    "\n".join(desc),
                    _unique(_text(rec.get("category"), "category", where, problems)),
                    " ".join(_text(rec.get("brand"), "brand", where, problems)),
                    _first_str(rec.get("imageURLHighRes")) or _first_str(rec.get("imageURL")))


def extract_item_fields(item_id, rec, where, problems) -> ItemMeta:
    """An item of the ``{item: {title, description, brand, categories}}`` layout that public sequential and
    generative recommendation repositories publish beside ``{user: [items]}`` (``from-sequences --items``):
    normalised as the releases above are; ``categories`` is a list or one comma-separated path; no image."""
    categories = rec.get("categories")
    if isinstance(categories, str):
        categories = categories.split(",")
    return ItemMeta(str(item_id),
                    " ".join(_text(rec.get("title"), "title", where, problems)),
                    "\n".join(_text(rec.get("description"), "description", where, problems)),
                    _unique(_text(categories, "categories", where, problems)),
                    " ".join(_text(rec.get("brand"), "brand", where, problems)),
                    None)


def _image_2023(images) -> Optional[str]:
    """The main image of a 2023 record: the MAIN variant if any, its hi_res, else large, else thumb.

    The raw files hold a list of ``{thumb, large, hi_res, variant}``; the Hugging Face copy stores the
    same as a dict of lists, also accepted.
    """
    if isinstance(images, dict):
        n = max((len(v) for v in images.values() if isinstance(v, list)), default=0)
        images = [{k: (v[j] if isinstance(v, list) and j < len(v) else None) for k, v in images.items()}
                  for j in range(n)]
    if not isinstance(images, list):
        return None
    entries = [e for e in images if isinstance(e, dict)]
    entries.sort(key=lambda e: e.get("variant") != "MAIN")   # stable: MAIN first, else file order
    for e in entries:
        ref = _first_str(e.get("hi_res")) or _first_str(e.get("large")) or _first_str(e.get("thumb"))
        if ref:
            return ref
    return None


def _extract_2023(item_id, rec, where, problems) -> ItemMeta:
    desc = _text(rec.get("description"), "description", where, problems)
    desc += _text(rec.get("features"), "features", where, problems)
    cats = _text(rec.get("main_category"), "main_category", where, problems)
    cats += _text(rec.get("categories"), "categories", where, problems)
    brand = _text(rec.get("store"), "store", where, problems)
    details = rec.get("details")
    if not brand and isinstance(details, dict):
        brand = _text(details.get("Brand"), "details.Brand", where, problems)
    return ItemMeta(item_id,
                    " ".join(_text(rec.get("title"), "title", where, problems)),
                    "\n".join(desc),
                    _unique(cats),
                    " ".join(brand),
                    _image_2023(rec.get("images")))


_EXTRACTORS = {"2014": _extract_2014, "2018": _extract_2018, "2023": _extract_2023}

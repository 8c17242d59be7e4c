"""``from-sequences``: per-user ordered item lists (and item metadata) -> a RecBole dataset.

Input: one JSON object ``{"<user>": [<item>, <item>, ...], ...}``, each list in the user's time order
(the format of ``shared/data/amazon-beauty-2014-5core/Beauty.inter.json``). Ids may be strings or
integers; both become tokens. The n-th item of a user's list gets timestamp n (1, 2, ...), which is
all that RecBole's time ordering (``order: TO``) needs. Written: ``NAME.inter``, ``NAME.stats.json`` and
``NAME.problems.jsonl``.

With ``items`` (``--items ITEMS.json``), the metadata layout that many public sequential and generative
recommendation repositories publish beside such sequences, ``{"<item>": {"title", "description", "brand",
"categories"}}``, the text sidecar ``NAME.text.jsonl`` and ``NAME.item`` (categories, brand) are written
too, normalised exactly as ``vlm2rec-data amazon`` does (``amazon.extract_item_fields``; no images). An item
of the sequences without metadata keeps its interactions and gets empty text (each one listed as a problem,
``item_without_metadata``); metadata of items that no sequence holds is ignored (counted in the stats).

Repeated items within a list are kept (they are real repeat purchases in some data sets) and counted
in the stats; an optional k-core can be applied.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from . import preprocess
from .amazon import extract_item_fields
from .convert import Result, output_dir, sidecar_record, write_dataset
from .problems import FatalInputError, Problems


def _read_json_object(path: pathlib.Path, layout: str) -> dict:
    if not path.is_file():
        raise FatalInputError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise FatalInputError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise FatalInputError(f"{path}: expected a JSON object {layout}, got a {type(data).__name__}")
    return data


def _item_records(items_path: pathlib.Path, item_ids, problems: Problems) -> tuple[list, int]:
    """Sidecar records of ``item_ids`` from the metadata file, and how many of its items no sequence holds."""
    meta = _read_json_object(items_path, '{"<item>": {"title": ..., "description": ..., "brand": ..., '
                                         '"categories": ...}}')
    records = []
    for item_id in sorted(item_ids):
        where = f"{items_path}: item {item_id}"
        rec = meta.get(item_id)
        if rec is None:
            problems.add("item_without_metadata", where, "no entry in the metadata; kept with empty text")
            rec = {}
        elif not isinstance(rec, dict):
            problems.add("meta_bad_field", where, f"expected an object, got {type(rec).__name__}; empty text")
            rec = {}
        records.append(sidecar_record(extract_item_fields(item_id, rec, where, problems), None))
    return records, len(set(meta) - set(item_ids))


def convert_sequences(input_path, out, name: str, kcore: int = 0, items_path=None) -> Result:
    input_path = pathlib.Path(input_path)
    data = _read_json_object(input_path, '{"<user>": [<item>, ...]}')
    problems = Problems()
    users, items, positions = [], [], []
    repeats = 0
    for user, seq in data.items():
        where = f"{input_path}: user {user}"
        if not isinstance(seq, list):
            problems.add("sequence_not_a_list", where, f"expected a list of items, got {type(seq).__name__}; skipped")
            continue
        good = [x for x in seq if isinstance(x, (str, int)) and not isinstance(x, bool) and str(x).strip()]
        if len(good) != len(seq):
            problems.add("sequence_bad_item", where, f"{len(seq) - len(good)} entries are not item ids "
                                                     f"(strings or integers); dropped")
        if not good:
            continue
        repeats += len(good) - len(set(good))
        users += [str(user)] * len(good)
        items += [str(x) for x in good]
        positions += range(1, len(good) + 1)
    if not users:
        raise FatalInputError(f"{input_path}: no usable sequences ({len(problems)} bad entries)")

    frame = preprocess.interactions_frame(users, items, np.asarray(positions, dtype=np.float64))
    filters = []
    if kcore > 1:
        frame, rec = preprocess.kcore(frame, kcore)
        filters.append(rec)
        if frame.empty:
            raise FatalInputError(f"{input_path}: no interactions left after the {kcore}-core; lower --kcore")
    frame = preprocess.sort_by_user_time(frame)
    source = {"kind": "sequences", "input": str(input_path), "users_read": len(data),
              "repeated_items_in_sequences": repeats, "timestamps": "position in the user's list, from 1"}
    records = None
    if items_path is not None:
        records, unused = _item_records(pathlib.Path(items_path), set(preprocess.present(frame, "item")), problems)
        source.update(items=str(items_path), metadata_items_not_in_sequences=unused)
    with output_dir(out, name) as dataset_dir:
        stats = write_dataset(dataset_dir, name, frame, records, problems, source, filters, {"kcore": kcore})
    return Result(dataset_dir, stats, problems)

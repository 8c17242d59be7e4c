"""``from-sequences``: per-user ordered item lists -> ``NAME.inter`` with order-derived timestamps.

Input: one JSON object ``{"<user>": [<item>, <item>, ...], ...}``, each list in the user's time order
(the format of ``shared/data/amazon-beauty-2014-5core/Beauty.inter.json``). Ids may be strings or
integers; both become tokens. The n-th item of a user's list gets timestamp n (1, 2, ...), which is
all that RecBole's time ordering (``order: TO``) needs. No ratings, no metadata: only ``NAME.inter``,
``NAME.stats.json`` and ``NAME.problems.jsonl`` are written.

Repeated items within a list are kept (they are real repeat purchases in some data sets) and counted
in the stats; an optional k-core can be applied.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from . import preprocess
from .convert import Result, output_dir, write_dataset
from .problems import FatalInputError, Problems


def convert_sequences(input_path, out, name: str, kcore: int = 0) -> Result:
    input_path = pathlib.Path(input_path)
    if not input_path.is_file():
        raise FatalInputError(f"{input_path}: file not found")
    try:
        with open(input_path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise FatalInputError(f"{input_path}: not a JSON file ({e})") from None
    if not isinstance(data, dict):
        raise FatalInputError(f'{input_path}: expected a JSON object {{"<user>": [<item>, ...]}}, '
                              f"got a {type(data).__name__}")
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
    with output_dir(out, name) as dataset_dir:
        stats = write_dataset(dataset_dir, name, frame, None, problems, source, filters, {"kcore": kcore})
    return Result(dataset_dir, stats, problems)

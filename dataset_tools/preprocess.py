"""The interaction table and the usual filters, vectorised (numpy/pandas): millions of reviews take seconds.

The table (:func:`interactions_frame`) has columns ``user`` and ``item`` (pandas categoricals, so that
every count, group and sort below works on integer codes instead of hashing strings again),
``timestamp`` (float seconds) and ``rating`` (float, NaN when unknown), in file order.

Each filter returns the filtered table plus a record of what it removed; the records go, in order,
into ``NAME.stats.json["filters"]``. Ties are always broken by file order, so the same input gives the
same output.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .atomic import as_token


def interactions_frame(users: Sequence, items: Sequence, timestamps: np.ndarray,
                       ratings: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Build the interaction table; ids are made valid RecBole tokens (:func:`as_token`).

    Only the distinct ids are checked and mapped, and metadata keys go through the same mapping, so
    reviews and metadata still match (two ids differing only in whitespace become one).
    """
    columns = {}
    for name, values in (("user", users), ("item", items)):
        codes, uniques = pd.factorize(pd.Series(values, dtype=object))
        uniques = np.asarray(uniques, dtype=object)
        # Most ids are tokens already (printable, no space, no quote): skip the regex for those.
        tokens = np.array([v if v.isprintable() and " " not in v and '"' not in v else as_token(v)
                           for v in uniques], dtype=object) if len(uniques) else uniques
        changed = tokens != uniques
        if changed.any():
            merged_codes, tokens = pd.factorize(pd.Series(tokens, dtype=object))
            codes = merged_codes[codes]
        columns[name] = pd.Categorical.from_codes(codes, categories=pd.Index(tokens, dtype=object))
    columns["timestamp"] = np.asarray(timestamps, dtype=np.float64)
    if ratings is not None:
        columns["rating"] = np.asarray(ratings, dtype=np.float64)
    return pd.DataFrame(columns)


def codes(frame: pd.DataFrame, column: str) -> np.ndarray:
    return frame[column].cat.codes.to_numpy().astype(np.int64)


def present(frame: pd.DataFrame, column: str) -> list:
    """The distinct ids that occur in ``column`` (categories keep ids that filters removed)."""
    cats = frame[column].cat.categories
    return cats[np.unique(codes(frame, column))].tolist()


def _n_distinct(c: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(c))) if len(c) else 0


def _record(step: str, before: pd.DataFrame, after: pd.DataFrame, **extra) -> dict:
    return {
        "step": step,
        "removed_interactions": int(len(before) - len(after)),
        "removed_users": _n_distinct(codes(before, "user")) - _n_distinct(codes(after, "user")),
        "removed_items": _n_distinct(codes(before, "item")) - _n_distinct(codes(after, "item")),
        "interactions_left": int(len(after)),
        **extra,
    }


def keep_items(frame: pd.DataFrame, items, step: str, **extra) -> tuple[pd.DataFrame, dict]:
    """Keep interactions whose item is in ``items`` (e.g. items with metadata, or with an image)."""
    cats = frame["item"].cat.categories
    allowed = np.asarray(cats.isin(list(items)), dtype=bool)
    out = frame[allowed[codes(frame, "item")]]
    return out, _record(step, frame, out, **extra)


def dedupe_user_item(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Keep one interaction per (user, item): the earliest, the first in the file among equal times."""
    u, i = codes(frame, "user"), codes(frame, "item")
    key = u * (len(frame["item"].cat.categories) + 1) + i
    # Hash first (linear time), then sort only the rows of repeated pairs: usually a few percent.
    repeated = np.flatnonzero(pd.Series(key).duplicated(keep=False).to_numpy())
    keep = np.ones(len(frame), dtype=bool)
    keep[repeated] = False
    # lexsort is stable and sorts by the last key first: pair, then time, then (stability) file position.
    order = repeated[np.lexsort((frame["timestamp"].to_numpy()[repeated], key[repeated]))]
    sorted_key = key[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    keep[order[first]] = True
    out = frame[keep]
    return out, _record("dedupe_user_item", frame, out, keep="earliest")


def min_rating(frame: pd.DataFrame, threshold: float) -> tuple[pd.DataFrame, dict]:
    """Keep interactions rated at least ``threshold`` (an interaction without a rating is dropped)."""
    out = frame[(frame["rating"] >= threshold).to_numpy()]
    return out, _record("min_rating", frame, out, threshold=threshold)


def kcore(frame: pd.DataFrame, k: int) -> tuple[pd.DataFrame, dict]:
    """Iterative k-core: drop users and items with fewer than ``k`` interactions until none is left."""
    u, i = codes(frame, "user"), codes(frame, "item")
    n_users, n_items = len(frame["user"].cat.categories), len(frame["item"].cat.categories)
    keep = np.ones(len(frame), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        user_count = np.bincount(u[keep], minlength=n_users)
        item_count = np.bincount(i[keep], minlength=n_items)
        new = keep & (user_count[u] >= k) & (item_count[i] >= k)
        if new.sum() == keep.sum():
            break
        keep = new
    out = frame[keep]
    return out, _record("kcore", frame, out, k=k, rounds=rounds)


def sort_by_user_time(frame: pd.DataFrame) -> pd.DataFrame:
    """Users in id order, each user's interactions by time (file order among equal times)."""
    cats = frame["user"].cat.categories.to_numpy(dtype=object)
    rank = np.empty(len(cats), dtype=np.int64)
    rank[np.argsort(cats, kind="stable")] = np.arange(len(cats))
    order = np.lexsort((frame["timestamp"].to_numpy(), rank[codes(frame, "user")]))   # stable
    return frame.iloc[order].reset_index(drop=True)


def summary_counts(frame: pd.DataFrame) -> dict:
    users = _n_distinct(codes(frame, "user"))
    items = _n_distinct(codes(frame, "item"))
    n = int(len(frame))
    return {
        "users": users,
        "items": items,
        "interactions": n,
        "density": n / (users * items) if users and items else 0.0,
        "mean_sequence_length": n / users if users else 0.0,
    }

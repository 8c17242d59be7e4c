"""Length buckets: a batch of prompts of different lengths run as a few forwards of similar lengths.

A left-padded batch computes ``rows x longest`` tokens; a user batch mixes short histories (one image) with
long ones (ten), so most of that can be padding. :func:`length_buckets` splits the rows into at most ``K``
groups, each padded only to its own longest row, choosing the split that computes the fewest tokens (exact,
by dynamic programming over the distinct lengths). ``K = 1`` is the single padded batch; with at most ``K``
distinct lengths no padding is computed at all. Each group is one more forward: on a GPU a few large forwards
beat one that is mostly padding, many tiny ones do not, hence the small bound (``length_buckets``, default 4).

Packed sequences with variable-length attention (flash-attention's ``cu_seqlens``) would remove the padding
with one forward; transformers runs them for Qwen-VL only with ``flash_attention_2``, which is not installed
here, so it is not offered (docs/design.md, known limits).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np


def length_buckets(lengths: Sequence[int], max_buckets: int) -> List[np.ndarray]:
    """Row indices of each group, longest group first; every row in exactly one group, in input order inside it.

    Minimises ``sum over groups of (rows in group x longest row in group)`` over all splits of the rows,
    sorted by length, into at most ``max_buckets`` contiguous runs.

    >>> [g.tolist() for g in length_buckets([5, 9, 5, 2, 9], 2)]
    [[1, 4], [0, 2, 3]]
    """
    if max_buckets < 1:
        raise ValueError(f"length_buckets: max_buckets must be >= 1, got {max_buckets!r}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    values, counts = np.unique(lengths, return_counts=True)
    values, counts = values[::-1], counts[::-1]  # distinct lengths, longest first
    if max_buckets == 1 or len(values) == 1:
        return [np.arange(len(lengths))]
    cuts = _best_cuts(values, counts, max_buckets)
    bounds = [values[start] for start in cuts]  # each group's longest length
    group_of = np.searchsorted(-np.asarray(bounds), -lengths, side="right") - 1  # group whose range holds the row
    return [np.flatnonzero(group_of == g) for g in range(len(bounds))]


def _best_cuts(values: np.ndarray, counts: np.ndarray, max_buckets: int) -> List[int]:
    """Start index (into ``values``, longest first) of each group of the cheapest split into <= ``max_buckets``.

    ``cost[k, j]``: fewest tokens for the ``j`` longest distinct lengths in ``k`` groups; a group covering
    distinct lengths ``i .. j-1`` costs ``values[i] * (rows with those lengths)``.
    """
    m = len(values)
    groups = min(max_buckets, m)
    rows_before = np.concatenate([[0], np.cumsum(counts)])  # rows with a length among values[:j]
    i = np.arange(m)[:, None]
    j = np.arange(1, m + 1)[None, :]
    group_cost = np.where(i < j, values[:, None] * (rows_before[None, 1:] - rows_before[:-1, None]), np.inf)
    cost = np.full((groups + 1, m + 1), np.inf)
    cost[0, 0] = 0.0
    start = np.zeros((groups + 1, m + 1), dtype=np.int64)
    for k in range(1, groups + 1):
        candidates = cost[k - 1, :m, None] + group_cost  # [i, j-1]: last group starts at i
        start[k, 1:] = np.argmin(candidates, axis=0)
        cost[k, 1:] = candidates[start[k, 1:], np.arange(m)]
    k = int(np.argmin(cost[1:, m])) + 1  # fewest tokens; ties go to fewer groups (fewer forwards)
    cuts, end = [], m
    while k:
        cuts.append(int(start[k, end]))
        end, k = cuts[-1], k - 1
    return cuts[::-1]


def visual_token_index(images_per_row: Sequence[int], rows: np.ndarray, tokens_per_image: int) -> np.ndarray:
    """Positions, in a batch's visual tokens (images in row order), of the tokens of ``rows``' images."""
    images = np.asarray(images_per_row, dtype=np.int64)
    first = (np.cumsum(images) - images) * tokens_per_image
    spans = [np.arange(first[r], first[r] + images[r] * tokens_per_image) for r in rows]
    return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)

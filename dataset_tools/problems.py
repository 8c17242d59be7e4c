"""Bad-input bookkeeping shared by every converter.

Two kinds of trouble, two mechanisms:

* A bad *record* (a malformed line, a review without a user, a corrupt image) is never fatal: it is
  added to a :class:`Problems` collector with where it was found (``file:line`` or ``item <id>``),
  counted per kind, skipped, and reported at the end (printed, in ``NAME.stats.json`` and listed in
  ``NAME.problems.jsonl``).
* A bad *input as a whole* (a missing, truncated or corrupt file, an undetectable release, nothing left
  after filtering) raises :class:`FatalInputError` naming the file; the CLI prints its message on one
  line and exits with status 1.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass


class FatalInputError(Exception):
    """The input cannot be converted at all; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Problem:
    kind: str      # stable machine name, e.g. "review_malformed_line"; the key of the counts
    where: str     # "path:line", "path: element 3" or "item B000123"
    message: str   # human explanation

    def as_dict(self) -> dict:
        return {"kind": self.kind, "where": self.where, "message": self.message}

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}: {self.message}"


class Problems:
    """Collects bad records. Every problem is kept (they are listed in full in ``NAME.problems.jsonl``)."""

    def __init__(self) -> None:
        self.entries: list[Problem] = []
        self.counts: collections.Counter = collections.Counter()

    def add(self, kind: str, where: str, message: str) -> None:
        self.entries.append(Problem(kind, where, message))
        self.counts[kind] += 1

    def __len__(self) -> int:
        return len(self.entries)

    def summary_lines(self, limit: int = 20) -> list[str]:
        """The first ``limit`` problems, then one line per kind for the rest."""
        lines = [str(p) for p in self.entries[:limit]]
        if len(self.entries) > limit:
            lines.append(f"... and {len(self.entries) - limit} more (all listed in the problems file)")
        return lines

"""Counting of used and skipped records per source and reason, and the bad-data stop rule.

Workers count into small int arrays that travel inside each batch (so counts survive Grain's
worker processes); the iterator sums them here, in the training process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from unified_mm.data.records import REASONS

OK_COLUMN = 0  # accounting arrays are [n_sources, 1 + len(REASONS)]: used, then one per reason


class BadDataError(ValueError):
    """Too many records of a source failed; the message names the source and the reasons."""


def new_accounting(n_sources: int) -> np.ndarray:
    return np.zeros((n_sources, 1 + len(REASONS)), np.int64)


def reason_column(reason: str) -> int:
    return 1 + REASONS.index(reason)


def describe_failures(row: np.ndarray) -> str:
    parts = [f"{r}: {int(row[1 + i])}" for i, r in enumerate(REASONS) if row[1 + i]]
    return ", ".join(parts) or "none"


class SkipStats:
    """Running counts: {source: {"used": n, "skipped": n, <reason>: n, ...}}."""

    def __init__(self, descriptions: Mapping[str, str]):
        self._names = list(descriptions)
        self._desc = dict(descriptions)
        self._counts = {n: np.zeros(1 + len(REASONS), np.int64) for n in self._names}

    def add(self, sources: Sequence[str], accounting: np.ndarray) -> None:
        for name, row in zip(sources, np.asarray(accounting)):
            self._counts[name] += row.astype(np.int64)

    def as_dict(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, row in self._counts.items():
            entry = {"used": int(row[OK_COLUMN]), "skipped": int(row[1:].sum())}
            entry.update({r: int(row[1 + i]) for i, r in enumerate(REASONS) if row[1 + i]})
            out[name] = entry
        return out

    def state(self) -> dict[str, list[int]]:
        return {name: [int(x) for x in row] for name, row in self._counts.items()}

    def load(self, state: Mapping[str, Sequence[int]]) -> None:
        for name, row in state.items():
            if name in self._counts and len(row) == 1 + len(REASONS):
                self._counts[name] = np.asarray(row, np.int64)

    def check(self, max_bad_fraction: float, min_records: int) -> None:
        """Raises BadDataError when a source's failed fraction exceeds max_bad_fraction.

        Judged once a source has min_records attempts (so a few early failures do not stop a
        run), or immediately when a source has produced nothing but failures for min(16,
        min_records) attempts.
        """
        for name, row in self._counts.items():
            bad = int(row[1:].sum())
            total = bad + int(row[OK_COLUMN])
            if total == 0:
                continue
            all_bad = row[OK_COLUMN] == 0 and total >= min(16, min_records)
            if all_bad or (total >= min_records and bad / total > max_bad_fraction):
                raise BadDataError(
                    f"data source {name!r} ({self._desc[name]}): {bad} of {total} records "
                    f"failed ({bad / total:.1%} > data.max_bad_fraction={max_bad_fraction}); "
                    f"reasons: {describe_failures(row)}"
                )

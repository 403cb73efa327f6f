"""A clu MetricWriter that appends one JSON line per scalar write (machine-readable history)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._file = open(path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a killed run keeps every row it logged

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


def read_metrics(workdir: str) -> list[dict]:
    """The rows of ``<workdir>/metrics.jsonl`` (later rows for a step replace earlier ones)."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed process
                continue
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]

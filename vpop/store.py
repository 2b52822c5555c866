"""The patients dataset on disk: a hive-partitioned parquet folder, written one chunk at a time.

Layout: ``patients.parquet/arm=NAME/draw=D/part-CCCCCC.parquet`` (C = chunk index). Read it whole with
``pandas.read_parquet(folder)`` (`arm` and `draw` come back as categorical columns from the folder
names) or a slice with ``filters=[("arm", "==", "iv")]``.

Each part is written under a temporary name and renamed into place, so a part either exists whole or
not at all: a run killed at any moment leaves only complete chunks, and the next run with the same
inputs (the same `run_key`) skips them. That is the whole resume mechanism.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

DATASET = "patients.parquet"


class PatientStore:
    """Chunks of one run's patient table under `root`/patients.parquet, plus a `run.json` describing the run."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dataset = self.root / DATASET

    def part(self, arm: str, draw: int, chunk: int) -> Path:
        return self.dataset / f"arm={arm}" / f"draw={draw}" / f"part-{chunk:06d}.parquet"

    def has(self, arm: str, draw: int, chunk: int) -> bool:
        return self.part(arm, draw, chunk).exists()

    def write(self, arm: str, draw: int, chunk: int, table: pd.DataFrame) -> None:
        """Write one chunk atomically (temporary file + rename); `arm` and `draw` live in the path."""
        path = self.part(arm, draw, chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        table.drop(columns=["arm", "draw"], errors="ignore").to_parquet(tmp, index=False)
        os.replace(tmp, path)

    def read(self, arm: str, draw: int, chunk: int) -> pd.DataFrame:
        """One chunk with its `arm` and `draw` columns restored (the layout of `patient_table`)."""
        t = pd.read_parquet(self.part(arm, draw, chunk))
        t.insert(0, "draw", draw)
        t.insert(0, "arm", arm)
        return t

    def open(self, info: dict) -> None:
        """Start (or resume) writing: record what the run is in run.json."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "run.json").write_text(json.dumps(info, indent=1, default=str))

    def finish(self) -> None:
        """Every part is written: drop temporary files left by a killed run's unfinished writes
        (readers skip them anyway, as hidden files; this keeps the result folder clean)."""
        for tmp in self.dataset.rglob(".part-*.tmp"):
            tmp.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def run_key(parts: Iterable) -> str:
    """A short digest of everything a run's patient rows depend on (arrays hashed by their bytes)."""
    h = hashlib.sha256()
    for x in parts:
        if isinstance(x, (np.ndarray, np.generic)) or hasattr(x, "__array__"):
            a = np.asarray(x)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        else:
            h.update(repr(x).encode())
        h.update(b"|")
    return h.hexdigest()[:16]

"""The patients dataset on disk: a hive-partitioned parquet folder, written one chunk at a time.

Layout: ``patients.parquet/arm=NAME/draw=D/part-CCCCCC.parquet`` (C = chunk index). Read it whole with
``pandas.read_parquet(folder)`` (`arm` and `draw` come back as categorical columns from the folder
names) or a slice with ``filters=[("arm", "==", "iv")]``.

Each part is written under a temporary name and renamed into place, so a part either exists whole or
not at all: a run killed at any moment leaves only complete chunks, and the next run with the same
inputs (the same `run_key`) skips them. That is the whole resume mechanism.

Parts are written by a few background threads (Arrow's parquet writer releases the GIL), so the trial
runner tabulates and counts the next chunk while the last one goes to disk: on a GPU the host, not the
device, bounded the streamed run (0.23.0, experiments/benchmarks/results/gpu/).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

DATASET = "patients.parquet"
WRITER_THREADS = min(2, os.cpu_count() or 1)  # 2 ran the host pipeline as fast as 4 (experiments/benchmarks/host_rows.py)


def write_part(table: pd.DataFrame, path: Path) -> None:
    """One parquet file, atomically (temporary file + rename). Only the string columns (dose labels,
    best response) are dictionary-encoded: encoding every column took 2.4x as long and gave a larger
    file (25,000 yardstick rows: 67 against 28 ms, 5.8 against 4.3 MB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    strings = [f.name for f in arrow.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    try:
        pq.write_table(arrow, tmp, use_dictionary=strings)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing (a killed process leaves the .tmp; `finish` drops it)
        raise
    os.replace(tmp, path)


class PatientStore:
    """Chunks of one run's patient table under `root`/patients.parquet, plus a `run.json` describing the run.

    writers: background threads writing the parts (0: write in the caller's thread). At most one part
    per thread is held for writing (`write` waits for the oldest beyond that), so host memory grows by
    at most `writers` chunk tables. A failed write raises in the `write` that waits for it, or in
    `close()`, which waits for every part handed over."""

    def __init__(self, root: str | Path, writers: int = 0):
        self.root = Path(root)
        self.dataset = self.root / DATASET
        self._writers = writers
        self._pool = ThreadPoolExecutor(writers, thread_name_prefix="vpop-writer") if writers > 0 else None
        self._pending: deque[Future] = deque()

    def part(self, arm: str, draw: int, chunk: int) -> Path:
        return self.dataset / f"arm={arm}" / f"draw={draw}" / f"part-{chunk:06d}.parquet"

    def has(self, arm: str, draw: int, chunk: int) -> bool:
        return self.part(arm, draw, chunk).exists()

    def write(self, arm: str, draw: int, chunk: int, table: pd.DataFrame) -> None:
        """Write one chunk (`write_part`; `arm` and `draw` live in the path), in the background when
        the store has writer threads: `table` must not change afterwards."""
        rows, path = table.drop(columns=["arm", "draw"], errors="ignore"), self.part(arm, draw, chunk)
        if self._pool is None:
            return write_part(rows, path)
        while len(self._pending) >= self._writers:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write_part, rows, path))

    def close(self) -> None:
        """Wait for every part handed to the writer threads and stop them (later writes are made in
        the caller's thread); raise the first error among those writes."""
        errors = [e for e in (f.exception() for f in self._pending) if e is not None]
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if errors:
            raise errors[0]

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
        """Every part is written (waits for the writer threads): drop temporary files left by a killed
        run's unfinished writes (readers skip them anyway, as hidden files; this keeps the result folder
        clean)."""
        self.close()
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

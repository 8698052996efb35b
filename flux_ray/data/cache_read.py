"""Range reads of cache rows from Parquet on local disk or S3, with retries that name the object.

A format-2 shard holds one row per row group, so the rows a window needs are read with
``ParquetFile.read_row_groups`` (pre_buffer: pyarrow coalesces adjacent ranges into one request).
pyarrow's S3 client retries throttling, 5xx and network errors itself (``storage._s3_filesystem``'s
retry strategy); :func:`with_retries` adds whole-read retries for failures inside a response body
(a connection reset mid-transfer) and turns a persistent failure into an error naming the URI.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from flux_ray import storage
from flux_ray.data.cache_layout import ROWS_PER_ROW_GROUP

log = logging.getLogger("flux_ray.cache_read")
T = TypeVar("T")
READ_ATTEMPTS = 4
BACKOFF_S = 0.2


class CacheReadError(OSError):
    """A cache object could not be read after every retry."""


def with_retries(uri: str, fn: Callable[[], T], attempts: int | None = None, backoff_s: float = BACKOFF_S) -> T:
    """``fn()``, retried with exponential backoff on OSError (pyarrow's IO errors); the last failure names ``uri``."""
    attempts = attempts or READ_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError as e:
            raise CacheReadError(f"cache object {uri} is missing: {e}") from e
        except OSError as e:
            if attempt == attempts:
                raise CacheReadError(f"reading cache object {uri} failed after {attempts} attempts: {e}") from e
            log.warning("reading %s failed (attempt %d/%d, retrying): %s", uri, attempt, attempts, e)
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


class ByteCounter:
    """Bytes a reader asked storage for (column chunks of the row groups read, footers, side files)."""

    def __init__(self):
        self._lock, self.bytes = threading.Lock(), 0

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += int(n)


def read_table(uri: str, st, columns: list[str] | None = None, counter: ByteCounter | None = None) -> pa.Table:
    """A whole (small) Parquet file, e.g. a ``.rows.parquet`` side file or an index."""
    def read():
        fs, path = storage.resolve(uri, st)
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=columns)
            if counter:
                counter.add(f.size())
            return table
    return with_retries(uri, read)


def read_rows(uri: str, st, rows: list[int], columns: list[str], counter: ByteCounter | None = None,
              footers: dict | None = None) -> pa.Table:
    """Rows ``rows`` (any order, repeats allowed) of a format-2 shard, only ``columns``, in the order asked.

    ``footers`` (uri -> FileMetaData) keeps each shard's footer after its first read: a shard is read
    in many windows, and its footer (one entry per row group) need not be fetched each time."""
    groups = sorted({r // ROWS_PER_ROW_GROUP for r in rows})

    def read():
        fs, path = storage.resolve(uri, st)
        with fs.open_input_file(path) as f:
            known = footers.get(uri) if footers is not None else None
            pf = pq.ParquetFile(f, pre_buffer=True, metadata=known)
            if footers is not None:
                footers[uri] = pf.metadata
            table = pf.read_row_groups(groups, columns=columns, use_threads=False)
            if counter:
                meta = pf.metadata
                wanted = set(columns)
                counter.add((0 if known else meta.serialized_size) + sum(
                    meta.row_group(g).column(c).total_compressed_size for g in groups
                    for c in range(meta.num_columns) if meta.row_group(g).column(c).path_in_schema in wanted))
            return table, [pf.metadata.row_group(g).num_rows for g in groups]
    table, sizes = with_retries(uri, read)
    first_row, pos = {}, 0
    for g, n in zip(groups, sizes):
        first_row[g] = pos
        pos += n
    take = [first_row[r // ROWS_PER_ROW_GROUP] + r % ROWS_PER_ROW_GROUP for r in rows]
    return table.take(pa.array(take, pa.int64()))

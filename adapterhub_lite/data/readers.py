"""Reading a dataset file or folder into rows through the `datasets` library, each row with its location.

Accepted: JSON Lines (``.jsonl``), a JSON array (``.json``), CSV (``.csv``), Parquet (``.parquet``), and
a folder written by ``datasets``' ``save_to_disk`` (its ``train`` split when it holds several). Rows keep
where they came from (``file:line`` for JSON Lines and CSV, ``file:[i]`` in a JSON array, ``file:row N``
in Parquet and saved folders) so that every error names its place.

When `datasets` cannot parse a JSON file (a syntax error on one line, a line that is not UTF-8), the
lines are scanned one by one to name the first bad one, or, where the recipe allows it, to skip the bad
lines and keep the rest.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapterhub_lite.errors import DatasetError

KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FILE_TYPES_HINT = "use a .jsonl, .json (array), .csv or .parquet file, or a folder saved with save_to_disk"


@dataclass(frozen=True)
class Row:
    """One record and where it is: ``line`` is the file line (JSONL/CSV) or the 1-based row number."""

    where: str
    line: int
    data: object  # a dict for a well-formed record


@dataclass(frozen=True)
class Bad:
    """A record that could not be read at all (not JSON, not UTF-8): where and what."""

    where: str
    line: int
    what: str


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets

    datasets.disable_progress_bars()
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # its own "Failed to load JSON" line: we name the line ourselves
    # Offline, and no "download count" request to a bucket for the json/csv builders: files are local.
    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = True, False
    try:
        yield
    finally:
        logger.setLevel(level)
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = saved


def _load(kind: str, path: Path):
    import datasets

    with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="ahl-ds-") as cache:
        # A throwaway cache: nothing is left in ~/.cache for a file read once.
        return datasets.load_dataset(
            kind, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
        ).to_list()


def _load_saved(path: Path) -> list[dict]:
    import datasets

    with _quiet_datasets():
        try:
            saved = datasets.load_from_disk(str(path), keep_in_memory=True)
        except Exception as exc:  # datasets raises FileNotFoundError or its own types
            raise DatasetError(
                f"{path}: a folder, but not one saved with datasets' save_to_disk ({str(exc)[:160]})",
                hint=FILE_TYPES_HINT,
            ) from None
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved:
            raise DatasetError(
                f"{path}: a saved DatasetDict without a 'train' split (has {', '.join(saved)})",
                hint="save the split to train on as 'train'",
            )
        saved = saved["train"]
    return saved.to_list()


def _scan_json_lines(path: Path) -> tuple[list[Row], list[Bad]]:
    """Parse a JSON Lines file line by line (the slow path, for files `datasets` refused)."""
    rows, bad = [], []
    with open(path, "rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append(Bad(where, lineno, f"not UTF-8 text ({exc.reason})"))
                continue
            if not raw.strip():
                continue
            try:
                rows.append(Row(where, lineno, json.loads(raw)))
            except json.JSONDecodeError as exc:
                bad.append(Bad(where, lineno, f"not valid JSON ({exc.msg} at column {exc.colno})"))
    return rows, bad


def _non_blank_lines(path: Path) -> list[int]:
    with open(path, "rb") as f:
        return [n for n, raw in enumerate(f, start=1) if raw.strip()]


def _csv_lines(path: Path) -> list[int]:
    """The line each CSV record starts on (a quoted field may span lines)."""
    starts = []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        start = 1
        for _ in reader:
            starts.append(start)
            start = reader.line_num + 1
    return starts[1:]  # the header is not a record


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def read_rows(path: Path) -> tuple[list[Row], list[Bad]]:
    """The records of a dataset file or saved folder, and the lines that could not be read (JSON Lines).

    Raises DatasetError for a file that cannot be read as its type at all.
    """
    if path.is_dir():
        data = _load_saved(path)
        return [Row(f"{path}:row {i}", i, r) for i, r in enumerate(data, start=1)], []
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(f"{path}: unknown dataset file type {path.suffix!r}", hint=FILE_TYPES_HINT)
    if path.stat().st_size == 0 or (kind == "json" and not any(_non_blank_lines(path))):
        return [], []
    array = kind == "json" and _is_json_array(path)
    try:
        data = _load(kind, path)
    except Exception as exc:  # datasets wraps pyarrow's and json's errors in several types
        if kind == "json" and not array:
            # Line by line: names the bad lines; lines of mixed shapes are each validated later.
            return _scan_json_lines(path)
        cause = exc.__cause__ or exc
        raise DatasetError(
            f"{path}: cannot be read as {'a JSON array' if array else kind.upper()} "
            f"({type(cause).__name__}: {str(cause)[:200]})",
            hint=FILE_TYPES_HINT,
        ) from None
    if array:
        return [Row(f"{path}:[{i}]", i + 1, r) for i, r in enumerate(data)], []
    lines = _non_blank_lines(path) if kind == "json" else _csv_lines(path) if kind == "csv" else []
    if len(lines) != len(data):
        prefix = "row " if kind != "csv" else "record "
        return [Row(f"{path}:{prefix}{i}", i, r) for i, r in enumerate(data, start=1)], []
    return [Row(f"{path}:{n}", n, r) for n, r in zip(lines, data, strict=True)], []

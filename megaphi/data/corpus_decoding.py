"""Decoding, the worker side of the corpus readers: a ``Batch`` of raw records (megaphi/data/corpus_readers.py)
-> the texts per key, validated, and the skipped records as (reason, location). Runs in the preprocessing
workers, so nothing here holds more than one record above ``max_document_bytes``."""

from __future__ import annotations

import json
import os
import stat
from typing import Dict, List, Optional, Tuple

from .corpus_readers import DEFAULT_MAX_DOCUMENT_BYTES, Batch, Oversize, describe_names


def _too_large(n: int, limit: int) -> str:
    return f"{n:,} bytes > --max-document-bytes {limit:,}"


def _read_source(path: str, limit: int):
    """(text bytes, None) or (None, (reason, location)). Opens without blocking (a FIFO never hangs)
    and reads at most limit + 1 bytes."""
    try:
        opened = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        return None, ("unreadable file", f"{path}: {e.strerror or e}")
    fd: Optional[int] = opened  # None once the file object owns it
    try:
        st = os.fstat(opened)
        if not stat.S_ISREG(st.st_mode):
            return None, ("not a regular file", path)
        if st.st_size > limit:
            return None, ("document too large", f"{path}: {_too_large(st.st_size, limit)}")
        with os.fdopen(opened, "rb") as f:
            fd = None
            raw = f.read(limit + 1)
    except OSError as e:
        return None, ("unreadable file", f"{path}: {e.strerror or e}")
    finally:
        if fd is not None:
            os.close(fd)
    if len(raw) > limit:  # grew since fstat
        return None, ("document too large", f"{path}: {_too_large(len(raw), limit)}")
    return raw, None


def _take_object(obj, where: str, keys, texts: dict, skipped: list, limit: int) -> None:
    """Validates one record (a JSON object or a dataset row) and appends its texts per key."""
    for key in keys:
        if key not in obj:
            skipped.append(("missing key", f"{where}: no key {key!r} (keys: {describe_names(obj)})"))
            continue
        text = obj[key]
        if isinstance(text, Oversize):
            skipped.append(("document too large", f"{where}: key {key!r}: {_too_large(text.nbytes, limit)}"))
            continue
        if isinstance(text, (bytes, bytearray)):  # binary columns (parquet, datasets) hold UTF-8 source
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                skipped.append(("undecodable bytes", f"{where}: key {key!r}: byte {e.start}"))
                continue
        if not isinstance(text, str):
            skipped.append(("non-string value", f"{where}: key {key!r} holds {type(text).__name__}"))
            continue
        if not text.strip():
            skipped.append(("empty document", f"{where}: key {key!r}"))
            continue
        try:
            text.encode("utf-8")  # lone surrogates from \ud800-style escapes cannot be tokenized
        except UnicodeEncodeError:
            skipped.append(("undecodable bytes", f"{where}: key {key!r} has an unpaired surrogate"))
            continue
        texts[key].append(text)


def decode_batch(batch: Batch, keys: List[str], max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES):
    """Texts per key of a batch, the skipped records as (reason, location), and the bytes read."""
    limit = max_document_bytes
    texts: Dict[str, List[str]] = {k: [] for k in keys}
    skipped: List[Tuple[str, str]] = []
    nbytes = 0
    if batch.kind == "error":
        return texts, [("unreadable file", batch.source)], 0
    if batch.kind == "skip":
        return texts, list(batch.items), 0
    if batch.kind == "files":
        key = keys[0]  # a source file is the first key's document
        for path in batch.items:
            raw, bad = _read_source(path, limit)
            if bad:
                skipped.append(bad)
                continue
            nbytes += len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skipped.append(("undecodable bytes", f"{path}: byte {e.start}"))
                continue
            if not text.strip():
                skipped.append(("empty document", path))
                continue
            texts[key].append(text)
        return texts, skipped, nbytes
    if batch.kind == "records":
        for i, row in enumerate(batch.items):
            _take_object(row, f"{batch.source}:row {batch.first_line + i}", keys, texts, skipped, limit)
        return texts, skipped, batch.size
    for i, line in enumerate(batch.items):
        where = f"{batch.source}:{batch.first_line + i}"
        if isinstance(line, Oversize):
            nbytes += line.nbytes
            skipped.append(("document too large", f"{where}: line of {_too_large(line.nbytes, limit)}"))
            continue
        nbytes += len(line)
        if not line.strip():
            continue  # blank lines separate nothing in JSONL; ignored
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            skipped.append(("undecodable bytes", f"{where}: byte {e.start}"))
            continue
        try:
            obj = json.loads(s)
        except RecursionError:
            skipped.append(("malformed JSON", f"{where}: nested too deeply"))
            continue
        except ValueError as e:
            skipped.append(("malformed JSON", f"{where}: {e}"))
            continue
        if not isinstance(obj, dict):
            skipped.append(("malformed JSON", f"{where}: not a JSON object"))
            continue
        _take_object(obj, where, keys, texts, skipped, limit)
    return texts, skipped, nbytes

"""The tokenizing stage of the preprocessing pipeline (megaphi/data/preprocess.py): worker processes decode
and tokenize batches of raw records (megaphi/data/corpus_decoding.py) into token arrays, and
``ordered_results`` hands their results back in input order."""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import sys
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from .corpus_decoding import decode_batch
from .corpus_readers import DEFAULT_MAX_DOCUMENT_BYTES, Batch

# One per process: the tokenizer and the options of init_worker. A module global, because a pool
# initializer has no other way to hand state to the tasks that run in the same worker.
_WORKER: Dict[str, Any] = {}
ENCODE_CHARS = 1 << 20  # text per encode_batch call: bounds the tokenizer's per-token objects


def share_tokenizer(tok, name: str) -> None:
    """Keep the main process's loaded tokenizer for the workers it forks (they skip loading it again)."""
    _WORKER.update(tok=tok, name=name)


def init_worker(
    tokenizer_name: str,
    keys: List[str],
    append_eod: bool,
    threads: int,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    in_pool: bool = True,
    parent_pid: Optional[int] = None,
) -> None:
    if in_pool:  # never in the main process (--workers 0): its handlers remove the temporary outputs
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool stops its workers with SIGTERM
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the main process handles it
        _exit_with_parent(parent_pid)
    # Before the tokenizer's first parallel use: one thread per worker unless asked otherwise.
    if threads <= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    if _WORKER.get("name") != tokenizer_name:  # forked workers inherit the parent's tokenizer
        from megaphi.tokenizer import load_tokenizer

        _WORKER.update(tok=load_tokenizer(tokenizer_name), name=tokenizer_name)
    _WORKER.update(keys=keys, append_eod=append_eod, max_document_bytes=max_document_bytes)


def _exit_with_parent(parent_pid: Optional[int]) -> None:
    """Linux: a worker gets SIGTERM (default action: exit, silently) when the main process dies, e.g. by
    kill -9, instead of finishing its batch and dying of a BrokenPipeError traceback on the closed pipe."""
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the main process died before the request: nobody will read our results
        os._exit(0)


def _to_arrays(ids_lists: List[List[int]], eod: Optional[int]):
    """Concatenates token lists (plus EOD after each) into one array with a per-document length array."""
    extra = 1 if eod is not None else 0
    lengths = np.fromiter((len(x) + extra for x in ids_lists), dtype=np.int64, count=len(ids_lists))
    total = int(lengths.sum())
    if eod is None:
        flat = np.fromiter((t for x in ids_lists for t in x), dtype=np.int64, count=total)
    else:
        flat = np.empty(total, dtype=np.int64)
        pos = 0
        for x in ids_lists:
            n = len(x)
            flat[pos : pos + n] = x
            flat[pos + n] = eod
            pos += n + 1
    # Ship the narrowest dtype that holds the values; the C++ builder range-checks against the output.
    if total and flat.min() >= 0 and flat.max() < 65536:
        flat = flat.astype(np.uint16)
    elif total and flat.min() >= -(2**31) and flat.max() < 2**31:
        flat = flat.astype(np.int32)
    return flat, lengths


def _encode_to_arrays(tok, docs: List[str], eod: Optional[int]):
    parts, start = [], 0
    while start < len(docs):  # sub-batches of about ENCODE_CHARS characters (at least one document)
        end, chars = start, 0
        while end < len(docs) and (end == start or chars + len(docs[end]) <= ENCODE_CHARS):
            chars += len(docs[end])
            end += 1
        parts.append(_to_arrays(tok.encode_batch(docs[start:end]), eod))
        start = end
    if len(parts) == 1:
        return parts[0]
    flats = [f for f, _ in parts]
    wide = max(flats, key=lambda f: f.dtype.itemsize).dtype
    return np.concatenate([f.astype(wide, copy=False) for f in flats]), np.concatenate([n for _, n in parts])


def tokenize_batch(batch: Batch):
    """Worker task: (per-key (tokens, lengths) or None, skipped records, bytes read, input bytes done)."""
    texts, skipped, nbytes = decode_batch(batch, _WORKER["keys"], _WORKER["max_document_bytes"])
    tok = _WORKER["tok"]
    eod = tok.eod_id if _WORKER["append_eod"] else None
    out = {}
    for key, docs in texts.items():
        out[key] = _encode_to_arrays(tok, docs, eod) if docs else None
    return out, skipped, nbytes, batch.size


def ordered_results(
    batches: Iterator[Batch],
    tokenizer_name: str,
    keys: List[str],
    append_eod: bool,
    workers: int,
    threads: int,
    max_document_bytes: int,
):
    """Yields tokenize_batch results in input order, with at most 2 * workers + 2 batches in flight
    (workers 0: tokenized in this process)."""
    if workers <= 0:
        init_worker(
            tokenizer_name,
            keys,
            append_eod,
            threads=max(1, os.cpu_count() or 1),
            max_document_bytes=max_document_bytes,
            in_pool=False,
        )
        for b in batches:
            yield tokenize_batch(b)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    init = (tokenizer_name, keys, append_eod, threads, max_document_bytes, True, os.getpid())
    with ctx.Pool(workers, initializer=init_worker, initargs=init) as pool:
        pending: collections.deque = collections.deque()
        limit = 2 * workers + 2
        for b in batches:
            pending.append(pool.apply_async(tokenize_batch, (b,)))
            if len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

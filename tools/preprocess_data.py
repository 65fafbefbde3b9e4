#!/usr/bin/env python3
"""Tokenize a code corpus into Megatron MMIDIDX token files: PREFIX_{key}_document.{bin,idx}.

Inputs (any number, in the order given): JSONL files (``.jsonl``/``.json``, one JSON object per line,
text under ``--json-keys``), gzipped JSONL (``.jsonl.gz``/``.json.gz``), directories of source files
(recursive, sorted path order, ``--extensions``, one document per file) and single source files.
Worker processes decode, validate and tokenize batches; the main process streams the token arrays, in
input order, into the C++ builder. EOD is appended to every document (``--no-append-eod`` to
disable). Bad records are skipped and counted (``--strict``: fatal). See docs/data.md.

    python tools/preprocess_data.py --input corpus.jsonl.gz src_tree/ --output-prefix data/code \\
        --tokenizer Salesforce/codegen-350M-mono --workers 8
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import multiprocessing
import os
import signal
import sys
import time
from typing import Iterator, List, NamedTuple, Optional

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
MAX_REPORTED = 5  # bad-input locations printed


# ----------------------------------------------------------------------------- reading
class Batch(NamedTuple):
    kind: str  # "jsonl": items are raw lines; "files": items are paths; "error": an unreadable input
    source: str  # file name (jsonl/error) or "" (files)
    first_line: int  # line number of items[0] (jsonl)
    items: list


def is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES)


def parse_extensions(spec: str) -> tuple:
    exts = tuple(e if e.startswith(".") else "." + e for e in (s.strip() for s in spec.split(",")) if e)
    if not exts:
        raise ValueError("--extensions is empty")
    return exts


def walk_sorted(root: str, extensions: tuple, errors: list) -> Iterator[str]:
    """Files under root ending with one of extensions, in sorted full-path order, without listing the
    whole tree at once (a directory sorts as its name + "/", which gives full-path order)."""
    try:
        entries = list(os.scandir(root))
    except OSError as e:
        errors.append(f"{root}: {e.strerror or e}")
        return
    keyed = []
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        keyed.append((entry.name + "/" if is_dir else entry.name, entry.path, is_dir))
    del entries
    for _, path, is_dir in sorted(keyed):
        if is_dir:
            yield from walk_sorted(path, extensions, errors)
        elif path.endswith(extensions):
            yield path


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def iter_batches(inputs: List[str], extensions: tuple, batch_size: int, batch_bytes: int = 1 << 62) -> Iterator[Batch]:
    """Batches of raw records (at most batch_size records or about batch_bytes bytes), in input order.
    Opening/reading failures become "error" batches."""
    for path in inputs:
        if os.path.isdir(path):
            errors: list = []
            items: list = []
            size = 0
            for f in walk_sorted(path, extensions, errors):
                while errors:
                    yield Batch("error", errors.pop(0), 0, [])
                items.append(f)
                size += _file_size(f)
                if len(items) >= batch_size or size >= batch_bytes:
                    yield Batch("files", "", 0, items)
                    items, size = [], 0
            while errors:
                yield Batch("error", errors.pop(0), 0, [])
            if items:
                yield Batch("files", "", 0, items)
        elif is_jsonl(path):
            yield from _jsonl_batches(path, batch_size, batch_bytes)
        else:
            yield Batch("files", "", 0, [path])


def _jsonl_batches(path: str, batch_size: int, batch_bytes: int) -> Iterator[Batch]:
    opener = gzip.open if path.endswith(".gz") else open
    line_no, items, first, size = 0, [], 1, 0
    try:
        with opener(path, "rb") as f:
            for line in f:
                line_no += 1
                items.append(line)
                size += len(line)
                if len(items) >= batch_size or size >= batch_bytes:
                    yield Batch("jsonl", path, first, items)
                    items, first, size = [], line_no + 1, 0
    except (OSError, EOFError, ValueError) as e:  # unreadable, truncated or corrupt gzip
        if items:
            yield Batch("jsonl", path, first, items)
            items = []
        where = f"{path}:{line_no + 1}" if line_no else path
        yield Batch("error", f"{where}: {getattr(e, 'strerror', None) or e}", 0, [])
    if items:
        yield Batch("jsonl", path, first, items)


def decode_batch(batch: Batch, keys: List[str]):
    """Texts per key of a batch, the skipped records as (reason, location), and the bytes read."""
    texts = {k: [] for k in keys}
    skipped = []
    nbytes = 0
    if batch.kind == "error":
        return texts, [("unreadable file", batch.source)], 0
    if batch.kind == "files":
        key = keys[0]  # a source file is the first key's document
        for path in batch.items:
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except OSError as e:
                skipped.append(("unreadable file", f"{path}: {e.strerror or e}"))
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
    for i, line in enumerate(batch.items):
        nbytes += len(line)
        where = f"{batch.source}:{batch.first_line + i}"
        if not line.strip():
            continue  # blank lines separate nothing in JSONL; ignored
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as e:
            skipped.append(("undecodable bytes", f"{where}: byte {e.start}"))
            continue
        try:
            obj = json.loads(s)
        except ValueError as e:
            skipped.append(("malformed JSON", f"{where}: {e}"))
            continue
        if not isinstance(obj, dict):
            skipped.append(("malformed JSON", f"{where}: not a JSON object"))
            continue
        for key in keys:
            if key not in obj:
                skipped.append(("missing key", f"{where}: no key {key!r}"))
                continue
            text = obj[key]
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
    return texts, skipped, nbytes


# ----------------------------------------------------------------------------- tokenizing
_WORKER = {}


def _init_worker(tokenizer_name: str, keys: List[str], append_eod: bool, threads: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool stops its workers with SIGTERM
    # Before the tokenizer's first parallel use: one thread per worker unless asked otherwise.
    if threads <= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    if _WORKER.get("name") != tokenizer_name:  # forked workers inherit the parent's tokenizer
        from megaphi.tokenizer import load_tokenizer

        _WORKER.update(tok=load_tokenizer(tokenizer_name), name=tokenizer_name)
    _WORKER.update(keys=keys, append_eod=append_eod)


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
            flat[pos:pos + n] = x
            flat[pos + n] = eod
            pos += n + 1
    # Ship the narrowest dtype that holds the values; the C++ builder range-checks against the output.
    if total and flat.min() >= 0 and flat.max() < 65536:
        flat = flat.astype(np.uint16)
    elif total and flat.min() >= -2**31 and flat.max() < 2**31:
        flat = flat.astype(np.int32)
    return flat, lengths


ENCODE_CHARS = 1 << 20  # text per encode_batch call: bounds the tokenizer's per-token objects


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
    """Worker task: (per-key (tokens, lengths) or None, skipped records, bytes read)."""
    texts, skipped, nbytes = decode_batch(batch, _WORKER["keys"])
    tok = _WORKER["tok"]
    eod = tok.eod_id if _WORKER["append_eod"] else None
    out = {}
    for key, docs in texts.items():
        out[key] = _encode_to_arrays(tok, docs, eod) if docs else None
    return out, skipped, nbytes


# ----------------------------------------------------------------------------- driver
class InputError(RuntimeError):
    pass


def output_prefix_for(prefix: str, key: str, level: str = "document") -> str:
    return f"{prefix}_{key}_{level}"


def _ordered_results(batches: Iterator[Batch], args):
    """Yields tokenize_batch results in input order, with at most 2 * workers + 2 batches in flight."""
    init = (args.tokenizer, args.json_keys, args.append_eod, args.tokenizer_threads)
    if args.workers <= 0:
        _init_worker(*init[:3], threads=max(1, os.cpu_count() or 1))
        for b in batches:
            yield tokenize_batch(b)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=init) as pool:
        pending = collections.deque()
        limit = 2 * args.workers + 2
        for b in batches:
            pending.append(pool.apply_async(tokenize_batch, (b,)))
            if len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl, .jsonl.gz) files, source directories or files")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys to tokenize (default: text); "
                   "one output per key; source files go to the first key")
    g.add_argument("--extensions", default=".py", help="comma-separated suffixes of source files taken from "
                   "directories (default: .py)")
    g.add_argument("--strict", action="store_true", help="stop with an error at the first bad record instead of skipping it")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", default=None,
                   help="tokenizer.json, tokenizer folder or Hugging Face Hub name (default: Salesforce/codegen-350M-mono)")
    g.add_argument("--append-eod", dest="append_eod", action="store_true", default=True,
                   help="append <|endoftext|> to every document (default)")
    g.add_argument("--no-append-eod", dest="append_eod", action="store_false", help="do not append EOD")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_{key}_document.{bin,idx}")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only Megatron's mmap format (MMIDIDX v1)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="tokenizer processes (0: tokenize in the main process)")
    g.add_argument("--tokenizer-threads", type=int, default=None, help="threads per worker (default: cores / workers)")
    g.add_argument("--batch-size", type=int, default=256, help="at most this many documents (JSONL lines / files) "
                   "per worker task")
    g.add_argument("--batch-bytes", type=int, default=256 << 10, help="... or about this many input bytes "
                   "(small tasks keep all workers busy to the end; default 256 KiB)")
    g.add_argument("--log-interval", type=int, default=1000, help="documents between progress updates")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def run(args) -> dict:
    """Runs the preprocessing described by parsed args; returns the summary. Raises InputError."""
    from tqdm import tqdm

    from megaphi.data.indexed_dataset import IndexedDatasetBuilder, dtype_for_vocab
    from megaphi.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

    args.tokenizer = args.tokenizer or DEFAULT_TOKENIZER
    for path in args.input:
        if not os.path.exists(path):
            raise InputError(f"--input {path}: no such file or directory")
    extensions = parse_extensions(args.extensions)
    if args.batch_size < 1 or args.batch_bytes < 1:
        raise InputError("--batch-size and --batch-bytes must be >= 1")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise InputError("--json-keys lists a key twice")
    if args.tokenizer_threads is None:
        args.tokenizer_threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))
    tok = load_tokenizer(args.tokenizer)  # fails early (and clearly) on a bad --tokenizer
    _WORKER.update(tok=tok, name=args.tokenizer)  # not used for encoding here: forked workers reuse it
    dtype = dtype_for_vocab(tok.vocab_size)

    outputs = {k: output_prefix_for(args.output_prefix, k) for k in args.json_keys}
    for prefix in outputs.values():
        for suffix in (".bin", ".idx"):
            if os.path.exists(prefix + suffix) and not args.overwrite:
                raise InputError(f"{prefix + suffix} exists; pass --overwrite to replace it")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise InputError(f"--output-prefix {args.output_prefix}: folder {out_dir} does not exist")

    tag = f".tmp-{os.getpid()}"
    builders, done, results = {}, False, None
    counts = collections.Counter()
    reported: List[str] = []
    docs = tokens = nbytes = 0
    t0 = time.time()
    bar = tqdm(unit=" docs", disable=args.quiet, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        for key, prefix in outputs.items():
            builders[key] = IndexedDatasetBuilder(prefix + ".bin" + tag, dtype)
        since = 0
        results = _ordered_results(iter_batches(args.input, extensions, args.batch_size, args.batch_bytes), args)
        for result, skipped, nb in results:
            for reason, where in skipped:
                if args.strict:
                    raise InputError(f"{reason} at {where} (--strict)")
                counts[reason] += 1
                if len(reported) < MAX_REPORTED:
                    reported.append(f"{reason}: {where}")
                    bar.write(f"warning: skipped {reason} at {where}", file=sys.stderr)
            nbytes += nb
            for key, arrays in result.items():
                if arrays is None:
                    continue
                flat, lengths = arrays
                try:
                    builders[key].add_documents(flat, lengths)
                except OverflowError as e:
                    raise InputError(f"{e} (while writing {outputs[key]}.bin)") from None
                docs += len(lengths)
                since += len(lengths)
                tokens += flat.size
            if since >= args.log_interval:
                elapsed = max(time.time() - t0, 1e-9)
                bar.update(since)
                bar.set_postfix_str(f"{tokens:,} tokens, {nbytes / 1e6 / elapsed:.1f} MB/s", refresh=False)
                since = 0
        bar.update(since)
        for key, prefix in outputs.items():
            builders[key].finalize(prefix + ".idx" + tag)
        for prefix in outputs.values():  # .bin first, .idx last: a present .idx means a complete pair
            if os.path.exists(prefix + ".idx"):  # --overwrite: never pair the new .bin with the old .idx
                os.remove(prefix + ".idx")
            os.replace(prefix + ".bin" + tag, prefix + ".bin")
            os.replace(prefix + ".idx" + tag, prefix + ".idx")
        done = True
    finally:
        bar.close()
        if results is not None:
            results.close()  # stops the worker pool now, also on errors
        if not done:
            for key, prefix in outputs.items():
                if key in builders and not builders[key]._builder.finalized:
                    builders[key].close()
                for suffix in (".bin", ".idx"):
                    try:
                        os.remove(prefix + suffix + tag)
                    except FileNotFoundError:
                        pass
    elapsed = time.time() - t0
    return {
        "documents": docs, "tokens": tokens, "bytes": nbytes, "skipped": dict(counts),
        "skipped_examples": reported, "seconds": elapsed, "outputs": list(outputs.values()),
        "dtype": np.dtype(dtype).name, "tokenizer": repr(tok),
    }


def print_summary(s: dict, out=None) -> None:
    out = out or sys.stderr
    el = max(s["seconds"], 1e-9)
    skipped = sum(s["skipped"].values())
    print(f"done: {s['documents']:,} documents, {s['tokens']:,} tokens ({s['dtype']}), "
          f"{s['bytes'] / 1e6:,.1f} MB read in {el:.1f} s: {_fmt_rate(s['documents'] / el)} docs/s, "
          f"{_fmt_rate(s['tokens'] / el)} tokens/s, {s['bytes'] / 1e6 / el:.1f} MB/s", file=out)
    if skipped:
        detail = ", ".join(f"{n:,} {r}" for r, n in sorted(s["skipped"].items()))
        print(f"skipped {skipped:,} records ({detail}); first ones:", file=out)
        for line in s["skipped_examples"]:
            print(f"  {line}", file=out)
    else:
        print("skipped 0 records", file=out)
    for prefix in s["outputs"]:
        print(f"wrote {prefix}.bin and {prefix}.idx", file=out)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _terminated(signum, frame):
    raise KeyboardInterrupt  # run() removes its temporary outputs on the way out


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated) if _is_main_thread() else None
    try:
        summary = run(args)
    except (InputError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("no output was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

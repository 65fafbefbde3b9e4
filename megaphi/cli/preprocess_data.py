"""Tokenize a code corpus into Megatron MMIDIDX token files: PREFIX_{key}_document.{bin,idx}.

Inputs (any number, in the order given): JSONL files (``.jsonl``/``.json``, one JSON object per line,
text under ``--json-keys``), gzipped JSONL (``.jsonl.gz``/``.json.gz``), parquet files (the text column
from ``--json-keys``), Hugging Face datasets saved with ``save_to_disk`` (a folder), ``hf:NAME`` (the
Hub, streamed), directories of source files (recursive, sorted path order, ``--extensions``, one
document per file) and single source files. Readers: megaphi/data/corpus_readers.py.
Worker processes decode, validate and tokenize batches; the main process streams the token arrays, in
input order, into the C++ builder. EOD is appended to every document (``--no-append-eod`` to
disable). Bad records are skipped and counted (``--strict``: fatal). See docs/data.md.

    python tools/preprocess_data.py --input corpus.jsonl.gz src_tree/ --output-prefix data/code \\
        --tokenizer Salesforce/codegen-350M-mono --workers 8
"""
from __future__ import annotations

import argparse
import collections
import glob
import multiprocessing
import os
import re
import signal
import sys
import time
from typing import Iterator, List, Optional

import numpy as np

from megaphi.data.corpus_readers import (  # noqa: E402  (tools/train_tokenizer.py imports the readers from here)
    DEFAULT_MAX_DOCUMENT_BYTES, Batch, HFOptions, decode_batch, input_size, iter_batches, parse_extensions)

MAX_REPORTED = 5  # bad-input locations printed


# ----------------------------------------------------------------------------- tokenizing
_WORKER = {}


def _init_worker(tokenizer_name: str, keys: List[str], append_eod: bool, threads: int,
                 max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES, in_pool: bool = True,
                 parent_pid: Optional[int] = None) -> None:
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
    """Worker task: (per-key (tokens, lengths) or None, skipped records, bytes read, input bytes done)."""
    texts, skipped, nbytes = decode_batch(batch, _WORKER["keys"], _WORKER["max_document_bytes"])
    tok = _WORKER["tok"]
    eod = tok.eod_id if _WORKER["append_eod"] else None
    out = {}
    for key, docs in texts.items():
        out[key] = _encode_to_arrays(tok, docs, eod) if docs else None
    return out, skipped, nbytes, batch.size


# ----------------------------------------------------------------------------- driver
class InputError(RuntimeError):
    pass


def output_prefix_for(prefix: str, key: str, level: str = "document") -> str:
    return f"{prefix}_{key}_{level}"


def _ordered_results(batches: Iterator[Batch], args):
    """Yields tokenize_batch results in input order, with at most 2 * workers + 2 batches in flight."""
    init = (args.tokenizer, args.json_keys, args.append_eod, args.tokenizer_threads, args.max_document_bytes)
    if args.workers <= 0:
        _init_worker(*init[:3], threads=max(1, os.cpu_count() or 1), max_document_bytes=args.max_document_bytes,
                     in_pool=False)
        for b in batches:
            yield tokenize_batch(b)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(*init, True, os.getpid())) as pool:
        pending = collections.deque()
        limit = 2 * args.workers + 2
        for b in batches:
            pending.append(pool.apply_async(tokenize_batch, (b,)))
            if len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaphi-preprocess", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    from megaphi.cli import add_version_flag
    add_version_flag(p)
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl, .jsonl.gz) or parquet files, saved Hugging "
                   "Face datasets (folders), hf:NAME (Hub, streamed), source directories or files")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys / parquet and dataset columns to "
                   "tokenize (default: text); one output per key; source files go to the first key")
    g.add_argument("--hf-split", default="train", help="split of a saved DatasetDict or an hf: dataset (default: train)")
    g.add_argument("--hf-subset", default=None, help="configuration name of hf: datasets (load_dataset's name)")
    g.add_argument("--hf-data-dir", default=None, help="data_dir of hf: datasets (e.g. data/python for the-stack-smol)")
    g.add_argument("--max-document-bytes", type=int, default=DEFAULT_MAX_DOCUMENT_BYTES,
                   help="skip (and count) records larger than this: a JSONL line, a source file, a parquet/dataset "
                   "value; tokenizing takes ~120 bytes of memory per input byte (default: 16 MiB)")
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
    g.add_argument("--log-interval", type=int, default=1000, help="documents between updates of the bar's "
                   "document and token counts")
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
    extensions = parse_extensions(args.extensions)
    hf = HFOptions(args.hf_split, args.hf_subset, args.hf_data_dir)
    sizes = [input_size(path, extensions, hf) for path in args.input]  # CorpusError: missing or unknown type
    total = None if None in sizes else sum(sizes)
    if args.batch_size < 1 or args.batch_bytes < 1:
        raise InputError("--batch-size and --batch-bytes must be >= 1")
    if args.max_document_bytes < 1:
        raise InputError("--max-document-bytes must be >= 1")
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

    for prefix in outputs.values():
        for path in remove_stale_temporaries(prefix):
            print(f"removed {path} (left by a run that no longer exists)", file=sys.stderr)
    tag = f".tmp-{os.getpid()}"
    builders, done, results = {}, False, None
    counts = collections.Counter()
    reported: List[str] = []
    docs = tokens = nbytes = 0
    key_docs = collections.Counter()
    key_skips = {k: collections.Counter() for k in args.json_keys}
    first_skip = {}  # key -> its first skipped record's "reason: where"
    t0 = time.time()
    # Byte-based: input bytes on disk (compressed for .gz and parquet); a total and an ETA unless an input's
    # size is unknown (a source folder is not walked twice, hf: datasets are streamed).
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=args.quiet, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    try:
        for key, prefix in outputs.items():
            builders[key] = IndexedDatasetBuilder(prefix + ".bin" + tag, dtype)
        since = 0
        batches = iter_batches(args.input, extensions, args.batch_size, args.batch_bytes, args.json_keys,
                               args.max_document_bytes, hf)
        results = _ordered_results(batches, args)
        for result, skipped, nb, done_bytes in results:
            for reason, where in skipped:
                if args.strict:
                    raise InputError(f"{reason} at {where} (--strict)")
                counts[reason] += 1
                key = _skipped_key(where, args.json_keys)
                key_skips[key][reason] += 1
                first_skip.setdefault(key, where)
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
                key_docs[key] += len(lengths)
                since += len(lengths)
                tokens += flat.size
            if since >= args.log_interval:
                bar.set_postfix_str(f"{docs:,} docs, {tokens:,} tokens", refresh=False)
                since = 0
            bar.update(done_bytes)
        bar.set_postfix_str(f"{docs:,} docs, {tokens:,} tokens", refresh=False)
        if docs == 0:
            raise InputError(f"no documents: {_why_empty(counts, first_skip.get(args.json_keys[0]))}")
        for key in args.json_keys:  # one key without documents would be an empty dataset: an error, not exit 0
            if key_docs[key] == 0:
                raise InputError(f"--json-keys {key}: no documents under key {key!r}: "
                                 f"{_why_empty(key_skips[key], first_skip.get(key))}")
        for key, prefix in outputs.items():
            builders[key].finalize(prefix + ".idx" + tag)
        for prefix in outputs.values():  # .bin first, .idx last: a present .idx means a complete pair
            if os.path.exists(prefix + ".idx"):  # --overwrite: never pair the new .bin with the old .idx
                os.remove(prefix + ".idx")
            os.replace(prefix + ".bin" + tag, prefix + ".bin")
            os.replace(prefix + ".idx" + tag, prefix + ".idx")
        done = True
    finally:
        # Aborting (an error or a signal is on its way out): a second Ctrl-C/SIGTERM must not cut the cleanup short.
        held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} \
            if not done and _is_main_thread() else {}
        try:
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
        finally:
            for s, handler in held.items():
                signal.signal(s, handler)
    elapsed = time.time() - t0
    return {
        "documents": docs, "tokens": tokens, "bytes": nbytes, "skipped": dict(counts),
        "skipped_examples": reported, "seconds": elapsed, "outputs": list(outputs.values()),
        "dtype": np.dtype(dtype).name, "tokenizer": repr(tok),
    }


def _skipped_key(where: str, keys: List[str]) -> str:
    """The --json-keys key a skipped record's location names (`key 'K'`, `no key 'K'`); a whole record
    skipped (malformed line, unreadable file) counts against the first key."""
    for key in keys:
        if f"key {key!r}" in where:
            return key
    return keys[0]


def _why_empty(counts: collections.Counter, first: Optional[str]) -> str:
    """Why nothing was written, in one line: the skip reasons counted and the first record skipped."""
    if not counts:
        return "the inputs hold no records"
    detail = ", ".join(f"{n:,} {r}" for r, n in sorted(counts.items()))
    return f"all {sum(counts.values()):,} records were skipped ({detail})" + (f"; first: {first}" if first else "")


def print_summary(s: dict, out=None) -> None:
    """The result of a finished run, on stdout (per-record warnings went to stderr)."""
    out = out or sys.stdout
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(prefix: str) -> List[str]:
    """Removes PREFIX.{bin,idx}.tmp-PID files whose PID is not a live process on this host (a killed
    run's leftovers); returns their paths. A live PID's files are kept (it may be a run in progress)."""
    removed = []
    for path in sorted(glob.glob(glob.escape(prefix) + ".*.tmp-*")):
        m = re.fullmatch(r"\.(?:bin|idx)\.tmp-(\d+)", path[len(prefix):])
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that run() removes its temporary outputs."""


def _terminated(signum, frame):
    raise Terminated


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminated) if _is_main_thread() else None
    try:
        summary = run(args)
    except (InputError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("no output was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # exit status 128 + signal number, as if killed by it
        term = isinstance(e, Terminated)
        print(f"interrupted by {'SIGTERM' if term else 'SIGINT'}; no output was written", file=sys.stderr)
        return 128 + (signal.SIGTERM if term else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

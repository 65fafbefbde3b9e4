"""The preprocessing pipeline: corpus -> Megatron MMIDIDX token files PREFIX_{key}_document.{bin,idx}.

readers (megaphi/data/corpus_readers.py: inputs -> batches of raw records, in input order) -> workers
(megaphi/data/preprocess_workers.py: decode, validate, tokenize) -> builder (the main process streams the
token arrays, in input order, into the C++ IndexedDatasetBuilder). Outputs are written under temporary
names and renamed into place only when complete. The command is megaphi/cli/preprocess_data.py
(``megaphi-preprocess``, ``python tools/preprocess_data.py``); docs/data.md describes it.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import signal
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from .corpus_readers import HFOptions, input_size, iter_batches, parse_extensions
from .preprocess_workers import ordered_results, share_tokenizer

MAX_REPORTED = 5  # bad-input locations printed


class InputError(RuntimeError):
    """Inputs or options that cannot make a dataset (nothing is written)."""


def output_prefix_for(prefix: str, key: str, level: str = "document") -> str:
    return f"{prefix}_{key}_{level}"


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def run(args) -> dict:
    """Runs the preprocessing described by the parsed options of megaphi-preprocess (read, never changed);
    returns the summary. Raises InputError (and CorpusError, OSError, ValueError) with nothing written."""
    from tqdm import tqdm

    from megaphi.data.indexed_dataset import IndexedDatasetBuilder, dtype_for_vocab
    from megaphi.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

    tokenizer_name = args.tokenizer or DEFAULT_TOKENIZER
    extensions = parse_extensions(args.extensions)
    hf = HFOptions(args.hf_split, args.hf_subset, args.hf_data_dir)
    sizes = [input_size(path, extensions, hf) for path in args.input]  # CorpusError: missing or unknown type
    total = None if None in sizes else sum(s or 0 for s in sizes)
    if args.batch_size < 1 or args.batch_bytes < 1:
        raise InputError("--batch-size and --batch-bytes must be >= 1")
    if args.max_document_bytes < 1:
        raise InputError("--max-document-bytes must be >= 1")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise InputError("--json-keys lists a key twice")
    threads = args.tokenizer_threads
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))
    tok = load_tokenizer(tokenizer_name)  # fails early (and clearly) on a bad --tokenizer
    share_tokenizer(tok, tokenizer_name)  # not used for encoding here: forked workers reuse it
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
    builders: Dict[str, IndexedDatasetBuilder] = {}
    done, results = False, None
    counts: collections.Counter = collections.Counter()
    reported: List[str] = []
    docs = tokens = nbytes = 0
    key_docs: collections.Counter = collections.Counter()
    key_skips: Dict[str, collections.Counter] = {k: collections.Counter() for k in args.json_keys}
    first_skip: Dict[str, str] = {}  # key -> its first skipped record's "reason: where"
    t0 = time.time()
    # Byte-based: input bytes on disk (compressed for .gz and parquet); a total and an ETA unless an input's
    # size is unknown (a source folder is not walked twice, hf: datasets are streamed).
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=args.quiet,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    try:
        for key, prefix in outputs.items():
            builders[key] = IndexedDatasetBuilder(prefix + ".bin" + tag, dtype)
        since = 0
        batches = iter_batches(
            args.input, extensions, args.batch_size, args.batch_bytes, args.json_keys, args.max_document_bytes, hf
        )
        results = ordered_results(
            batches, tokenizer_name, args.json_keys, args.append_eod, args.workers, threads, args.max_document_bytes
        )
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
                raise InputError(
                    f"--json-keys {key}: no documents under key {key!r}: "
                    f"{_why_empty(key_skips[key], first_skip.get(key))}"
                )
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
        held = (
            {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
            if not done and _is_main_thread()
            else {}
        )
        try:
            bar.close()
            if results is not None:
                results.close()  # stops the worker pool now, also on errors
            if not done:
                for key, prefix in outputs.items():
                    if key in builders and not builders[key].finalized:
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
        "documents": docs,
        "tokens": tokens,
        "bytes": nbytes,
        "skipped": dict(counts),
        "skipped_examples": reported,
        "seconds": elapsed,
        "outputs": list(outputs.values()),
        "dtype": np.dtype(dtype).name,
        "tokenizer": repr(tok),
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
    print(
        f"done: {s['documents']:,} documents, {s['tokens']:,} tokens ({s['dtype']}), "
        f"{s['bytes'] / 1e6:,.1f} MB read in {el:.1f} s: {_fmt_rate(s['documents'] / el)} docs/s, "
        f"{_fmt_rate(s['tokens'] / el)} tokens/s, {s['bytes'] / 1e6 / el:.1f} MB/s",
        file=out,
    )
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
        m = re.fullmatch(r"\.(?:bin|idx)\.tmp-(\d+)", path[len(prefix) :])
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

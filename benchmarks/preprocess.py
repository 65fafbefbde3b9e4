#!/usr/bin/env python3
"""Benchmark tools/preprocess_data.py: throughput against the raw tokenizer, and peak memory.

1. Throughput: end-to-end preprocess (subprocess, ``--workers N``, wall clock incl. start-up and the
   .bin/.idx writes) against the raw ``tokenizer.encode_batch`` (Rust, all cores, corpus already in
   memory, same batch size) on the same corpus and cores. Tokens exclude the appended EODs.
2. Peak RSS on corpora of several sizes (the stdlib corpus repeated): the main process's peak
   (VmHWM), the largest worker's, and the peak of the sum over the process tree (sampled every 0.1 s).

Defaults are small (a couple of minutes on 2 cores); the figures in docs/data.md used
``--rss-sizes 0.25GB,1GB``.

    python benchmarks/preprocess.py --tokenizer ../shared/tokenizers/codegen-350M-mono --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megaphi.cli.make_stdlib_corpus import make_corpus, parse_size  # noqa: E402

DEFAULT_TOKENIZER = os.path.join(os.path.dirname(REPO), "shared", "tokenizers", "codegen-350M-mono")


def _proc_tree(pid: int):
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_preprocess(corpus: str, prefix: str, tokenizer: str, workers: int, batch_size: int, monitor: bool):
    """Runs preprocess_data.py; returns (wall seconds, seconds the tool reports (after start-up),
    CPU seconds of the whole process tree, peaks in MB: main, worker, total)."""
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "preprocess_data.py"),
        "--input",
        corpus,
        "--output-prefix",
        prefix,
        "--tokenizer",
        tokenizer,
        "--workers",
        str(workers),
        "--batch-size",
        str(batch_size),
        "--overwrite",
        "--quiet",
    ]
    peaks = {"main": 0, "worker": 0, "total": 0}
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            tree = _proc_tree(proc.pid)
            peaks["main"] = max(peaks["main"], _status_kb(proc.pid, "VmHWM"))
            for p in tree[1:]:
                peaks["worker"] = max(peaks["worker"], _status_kb(p, "VmHWM"))
            peaks["total"] = max(peaks["total"], sum(_status_kb(p, "VmRSS") for p in tree))
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    if monitor:
        th.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    if monitor:
        th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess_data failed ({proc.returncode}):\n{err}")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    m = re.search(r"read in ([0-9.]+) s", err)
    inner = float(m.group(1)) if m else seconds
    return seconds, inner, cpu, {k: v / 1024 for k, v in peaks.items()}


def raw_encode(corpus: str, tokenizer: str, batch_size: int):
    from megaphi.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    with open(corpus, "rb") as f:
        texts = [json.loads(line)["text"] for line in f]
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for i in range(0, len(texts), batch_size):
        n += sum(len(x) for x in tok.encode_batch(texts[i : i + batch_size]))
    return n, time.perf_counter() - t0, time.process_time() - c0, len(texts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--throughput-size",
        type=parse_size,
        default=parse_size("16MB"),
        help="corpus size of the throughput run (stdlib files, cut or repeated)",
    )
    p.add_argument("--repeats", type=int, default=2, help="throughput runs (best is kept: the machine may be busy)")
    p.add_argument("--rss-sizes", default="25MB,100MB", help="comma-separated corpus sizes for the memory runs")
    p.add_argument("--work-dir", default=None, help="where corpora and outputs go (default: a temp folder)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    args = p.parse_args(argv)

    from megaphi.data.indexed_dataset import IndexedDataset
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    work = args.work_dir or tempfile.mkdtemp(prefix="megaphi_bench_")
    os.makedirs(work, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    print(
        f"# preprocess_data benchmark: {cores} cores, tokenizer {args.tokenizer}, workers {args.workers}, "
        f"batch {args.batch_size}, work dir {work}"
    )

    if not args.skip_throughput:
        corpus = os.path.join(work, "throughput.jsonl")
        info = make_corpus(corpus, stdlib, target_size=args.throughput_size, overwrite=True)
        raw, e2e, inner = [], [], []  # (wall, cpu) per run
        for _ in range(args.repeats):
            n_raw, t_raw, c_raw, docs = raw_encode(corpus, args.tokenizer, args.batch_size)
            raw.append((t_raw, c_raw))
            t_e2e, t_in, c_e2e, _ = run_preprocess(
                corpus, os.path.join(work, "tp"), args.tokenizer, args.workers, args.batch_size, False
            )
            ds = IndexedDataset(os.path.join(work, "tp_text_document"))
            n_e2e = ds.num_tokens - ds.num_documents  # without the EODs
            assert n_e2e == n_raw, (n_e2e, n_raw)
            e2e.append((t_e2e, c_e2e))
            inner.append((t_in, c_e2e))
        mb = info["bytes"] / 1e6
        print(f"\n## Throughput ({mb:.1f} MB, {docs:,} documents, {n_raw:,} tokens; best of {args.repeats} runs)\n")
        print("| method | wall s | tokens/s | MB/s | relative | CPU s | tokens per CPU s | relative |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        rows = [
            (f"raw tokenizer.encode_batch ({cores} threads, text in memory)", raw),
            (f"preprocess_data.py --workers {args.workers}, end to end (process start to exit)", e2e),
            (f"preprocess_data.py --workers {args.workers}, after start-up (its own timer)", inner),
        ]
        ref_wall, ref_cpu = min(w for w, _ in raw), min(c for _, c in raw)
        for name, runs in rows:
            wall, cpu = min(w for w, _ in runs), min(c for _, c in runs)
            print(
                f"| {name} | {wall:.1f} | {n_raw / wall:,.0f} | {mb / wall:.2f} | {100 * ref_wall / wall:.1f}% | "
                f"{cpu:.1f} | {n_raw / cpu:,.0f} | {100 * ref_cpu / cpu:.1f}% |"
            )

    if not args.skip_rss:
        print("\n## Peak memory\n")
        print(
            "| corpus | documents | tokens | time (s) | tokens/s | main peak RSS (MB) | largest worker (MB) | "
            "process tree peak (MB) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for spec in args.rss_sizes.split(","):
            size = parse_size(spec)
            corpus = os.path.join(work, "rss.jsonl")
            info = make_corpus(corpus, stdlib, target_size=size, overwrite=True)
            seconds, _, _, peaks = run_preprocess(
                corpus, os.path.join(work, "rss"), args.tokenizer, args.workers, args.batch_size, True
            )
            ds = IndexedDataset(os.path.join(work, "rss_text_document"))
            print(
                f"| {info['bytes'] / 1e9:.3f} GB | {ds.num_documents:,} | {ds.num_tokens:,} | {seconds:.0f} | "
                f"{ds.num_tokens / seconds:,.0f} | {peaks['main']:.0f} | {peaks['worker']:.0f} | {peaks['total']:.0f} |",
                flush=True,
            )
            del ds
            for suffix in (".bin", ".idx"):
                os.remove(os.path.join(work, "rss_text_document" + suffix))
            os.remove(corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())

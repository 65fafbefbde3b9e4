"""Turn the Python standard library's sources into a JSONL corpus ({"text": ..., "path": ...} per file).

A small, license-clean, always-available code corpus for the quickstart and the benchmarks. Files are
taken in sorted path order (site-packages excluded; files that are not UTF-8 are skipped).
``--target-size`` cuts the file list, or repeats it, so that the output has about that size (benchmarks).

    python tools/make_stdlib_corpus.py --output data/stdlib.jsonl
    python tools/make_stdlib_corpus.py --output /tmp/stdlib_1g.jsonl --target-size 1GB
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from typing import Iterator, List, Optional

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1e3,
    "KB": 1e3,
    "M": 1e6,
    "MB": 1e6,
    "G": 1e9,
    "GB": 1e9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num) :]
    if unit not in _UNITS or not num:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (e.g. 250MB, 1GB, 1GiB)")
    return int(float(num) * _UNITS[unit])


def stdlib_files(root: str, exclude_tests: bool) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in ("site-packages", "dist-packages", "__pycache__")
            and not (exclude_tests and d in ("test", "tests", "idle_test"))
        )
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaphi-stdlib-corpus", description=__doc__.split("\n\n")[0])
    from megaphi.cli import add_version_flag

    add_version_flag(p)
    p.add_argument("--output", required=True, help="JSONL file to write (.jsonl)")
    p.add_argument("--stdlib-dir", default=sysconfig.get_paths()["stdlib"], help="default: this Python's stdlib")
    p.add_argument("--exclude-tests", action="store_true", help="leave out test/ and tests/ folders")
    p.add_argument("--max-files", type=int, default=None, help="take only the first N files")
    p.add_argument(
        "--target-size",
        type=parse_size,
        default=None,
        help="stop at, or repeat the files until, this output size (e.g. 1GB)",
    )
    p.add_argument("--overwrite", action="store_true")
    return p


def make_corpus(
    output: str,
    stdlib_dir: str,
    exclude_tests: bool = False,
    max_files: Optional[int] = None,
    target_size: Optional[int] = None,
    overwrite: bool = False,
) -> dict:
    if os.path.exists(output) and not overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it")
    if not os.path.isdir(stdlib_dir):
        raise ValueError(f"--stdlib-dir {stdlib_dir}: not a folder")
    records: List[bytes] = []  # one pass over the stdlib (~100 MB at most), then repeated
    for path in stdlib_files(stdlib_dir, exclude_tests):
        if max_files is not None and len(records) >= max_files:
            break
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        rel = os.path.relpath(path, stdlib_dir)
        records.append((json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n").encode("utf-8"))
    if not records:
        raise ValueError(f"no Python files found under {stdlib_dir}")
    tmp = output + f".tmp-{os.getpid()}"
    size = docs = copies = 0
    with open(tmp, "wb") as f:
        while target_size is None or size < target_size:
            for r in records:
                if target_size is not None and size >= target_size:
                    break
                f.write(r)
                size += len(r)
                docs += 1
            copies += 1
            if target_size is None:
                break
    os.replace(tmp, output)
    return {"files": min(len(records), docs), "copies": copies, "documents": docs, "bytes": size}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = make_corpus(
            args.output, args.stdlib_dir, args.exclude_tests, args.max_files, args.target_size, args.overwrite
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output}: {s['documents']:,} documents from {s['files']:,} stdlib files, "
        f"{s['bytes'] / 1e6:,.1f} MB"
    )  # the result: stdout
    return 0


if __name__ == "__main__":
    sys.exit(main())

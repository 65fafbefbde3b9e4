"""Concatenate several MMIDIDX datasets (PREFIX.bin/.idx, same token dtype) into one, in the order
given. Streams the token files in chunks, so memory stays bounded whatever their size.

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaphi-merge-datasets", description=__doc__.split("\n\n")[0])
    from megaphi.cli import add_version_flag

    add_version_flag(p)
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="dataset prefixes (without .bin/.idx), or a folder: every *.idx in it, sorted",
    )
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--chunk-tokens", type=int, default=1 << 24, help="tokens read per chunk (memory bound)")
    return p


def _expand(inputs: List[str]) -> List[str]:
    from megaphi.data.indexed_dataset import strip_suffix

    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f[:-4]) for f in os.listdir(item) if f.endswith(".idx"))
            if not found:
                raise ValueError(f"--input {item}: folder holds no .idx files")
            prefixes += found
        else:
            prefixes.append(strip_suffix(item))
    return prefixes


def merge(inputs: List[str], output_prefix: str, overwrite: bool = False, chunk_tokens: int = 1 << 24) -> dict:
    from megaphi.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    prefixes = _expand(inputs)
    datasets = [IndexedDataset(p) for p in prefixes]  # validates every input before writing anything
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) != 1:
        listing = ", ".join(f"{ds.path_prefix} ({ds.dtype.name})" for ds in datasets)
        raise ValueError(f"inputs have different token dtypes, cannot merge: {listing}")
    out_bin, out_idx = output_prefix + ".bin", output_prefix + ".idx"
    for path in (out_bin, out_idx):
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{path} exists; pass --overwrite to replace it")
        if os.path.abspath(path) in {os.path.abspath(p) for ds in datasets for p in (ds.bin_path, ds.idx_path)}:
            raise ValueError(f"output {path} is also an input")
    dtype = datasets[0].dtype
    del datasets
    tag = f".tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(out_bin + tag, dtype)
    ok = False
    try:
        for prefix in prefixes:
            builder.add_index(prefix, chunk_tokens=chunk_tokens)
        builder.finalize(out_idx + tag)
        os.replace(out_bin + tag, out_bin)
        os.replace(out_idx + tag, out_idx)
        ok = True
    finally:
        if not ok:
            builder.close()
            for path in (out_bin + tag, out_idx + tag):
                if os.path.exists(path):
                    os.remove(path)
    return {
        "inputs": prefixes,
        "sequences": builder.num_sequences,
        "documents": builder.num_documents,
        "tokens": builder.num_tokens,
        "dtype": dtype.name,
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        s = merge(args.input, args.output_prefix, args.overwrite, args.chunk_tokens)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("no output was written", file=sys.stderr)
        return 1
    print(
        f"merged {len(s['inputs'])} datasets: {s['documents']:,} documents, {s['sequences']:,} sequences, "
        f"{s['tokens']:,} {s['dtype']} tokens in {time.time() - t0:.1f} s -> "
        f"{args.output_prefix}.bin/.idx"
    )  # the result: stdout
    return 0


if __name__ == "__main__":
    sys.exit(main())

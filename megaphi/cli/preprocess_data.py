"""Tokenize a code corpus into Megatron MMIDIDX token files: PREFIX_{key}_document.{bin,idx}.

Inputs (any number, in the order given): JSONL files (``.jsonl``/``.json``, one JSON object per line,
text under ``--json-keys``), gzipped JSONL (``.jsonl.gz``/``.json.gz``), parquet files (the text column
from ``--json-keys``), Hugging Face datasets saved with ``save_to_disk`` (a folder), ``hf:NAME`` (the
Hub, streamed), directories of source files (recursive, sorted path order, ``--extensions``, one
document per file) and single source files. Worker processes decode, validate and tokenize batches; the
main process streams the token arrays, in input order, into the C++ builder (the pipeline is
megaphi/data/preprocess.py; this module parses the flags and runs it). EOD is appended to every document
(``--no-append-eod`` to disable). Bad records are skipped and counted (``--strict``: fatal). See docs/data.md.

    python tools/preprocess_data.py --input corpus.jsonl.gz src_tree/ --output-prefix data/code \\
        --tokenizer Salesforce/codegen-350M-mono --workers 8
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import List, Optional

from megaphi.cli import add_version_flag
from megaphi.data.corpus_readers import DEFAULT_MAX_DOCUMENT_BYTES
from megaphi.data.preprocess import InputError, print_summary, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megaphi-preprocess",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_flag(p)
    g = p.add_argument_group("input")
    g.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="JSONL (.jsonl, .jsonl.gz) or parquet files, saved Hugging "
        "Face datasets (folders), hf:NAME (Hub, streamed), source directories or files",
    )
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSONL keys / parquet and dataset columns to "
        "tokenize (default: text); one output per key; source files go to the first key",
    )
    g.add_argument(
        "--hf-split", default="train", help="split of a saved DatasetDict or an hf: dataset (default: train)"
    )
    g.add_argument("--hf-subset", default=None, help="configuration name of hf: datasets (load_dataset's name)")
    g.add_argument("--hf-data-dir", default=None, help="data_dir of hf: datasets (e.g. data/python for the-stack-smol)")
    g.add_argument(
        "--max-document-bytes",
        type=int,
        default=DEFAULT_MAX_DOCUMENT_BYTES,
        help="skip (and count) records larger than this: a JSONL line, a source file, a parquet/dataset "
        "value; tokenizing takes ~120 bytes of memory per input byte (default: 16 MiB)",
    )
    g.add_argument(
        "--extensions",
        default=".py",
        help="comma-separated suffixes of source files taken from directories (default: .py)",
    )
    g.add_argument(
        "--strict", action="store_true", help="stop with an error at the first bad record instead of skipping it"
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--tokenizer",
        "--tokenizer-model",
        dest="tokenizer",
        default=None,
        help="tokenizer.json, tokenizer folder or Hugging Face Hub name (default: Salesforce/codegen-350M-mono)",
    )
    g.add_argument(
        "--append-eod",
        dest="append_eod",
        action="store_true",
        default=True,
        help="append <|endoftext|> to every document (default)",
    )
    g.add_argument("--no-append-eod", dest="append_eod", action="store_false", help="do not append EOD")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_{key}_document.{bin,idx}")
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only Megatron's mmap format (MMIDIDX v1)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="tokenizer processes (0: tokenize in the main process)",
    )
    g.add_argument("--tokenizer-threads", type=int, default=None, help="threads per worker (default: cores / workers)")
    g.add_argument(
        "--batch-size", type=int, default=256, help="at most this many documents (JSONL lines / files) per worker task"
    )
    g.add_argument(
        "--batch-bytes",
        type=int,
        default=256 << 10,
        help="... or about this many input bytes (small tasks keep all workers busy to the end; default 256 KiB)",
    )
    g.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="documents between updates of the bar's document and token counts",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that run() removes its temporary outputs."""


def _terminated(signum, frame):
    raise Terminated


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal() works there only
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
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

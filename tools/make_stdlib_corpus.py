#!/usr/bin/env python
"""Turn the Python standard library's sources into a JSONL corpus. `python tools/make_stdlib_corpus.py --help`.

The code is megaphi.cli.make_stdlib_corpus, installed as the `megaphi-stdlib-corpus` command.
"""
import sys

from megaphi.cli import make_stdlib_corpus as _tool
from megaphi.cli import tool_wrapper_namespace

globals().update(tool_wrapper_namespace(_tool))

if __name__ == "__main__":
    sys.exit(_tool.main())

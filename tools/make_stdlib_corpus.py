#!/usr/bin/env python
"""Turn the Python standard library's sources into a JSONL corpus. `python tools/make_stdlib_corpus.py --help`.

The code is megaphi/cli/make_stdlib_corpus.py, installed as the `megaphi-stdlib-corpus` command; this file runs it as its own module.
"""
from megaphi.cli import exec_tool

exec_tool("make_stdlib_corpus", globals())

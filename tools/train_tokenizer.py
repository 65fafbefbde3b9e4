#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on a corpus, offline. `python tools/train_tokenizer.py --help`.

The code is megaphi/cli/train_tokenizer.py, installed as the `megaphi-train-tokenizer` command; this file runs it as its own module.
"""
from megaphi.cli import exec_tool

exec_tool("train_tokenizer", globals())

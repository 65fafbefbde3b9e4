#!/usr/bin/env python
"""Turn a corpus (JSONL, parquet, HF datasets, source trees) into Megatron .bin/.idx token files. `python tools/preprocess_data.py --help`.

The code is megaphi/cli/preprocess_data.py, installed as the `megaphi-preprocess` command; this file runs it as its own module.
"""
from megaphi.cli import exec_tool

exec_tool("preprocess_data", globals())

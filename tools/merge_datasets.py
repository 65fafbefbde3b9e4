#!/usr/bin/env python
"""Concatenate several MMIDIDX datasets (PREFIX.bin/.idx) into one. `python tools/merge_datasets.py --help`.

The code is megaphi/cli/merge_datasets.py, installed as the `megaphi-merge-datasets` command; this file runs it as its own module.
"""
from megaphi.cli import exec_tool

exec_tool("merge_datasets", globals())

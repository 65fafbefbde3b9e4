#!/usr/bin/env python
"""Concatenate several MMIDIDX datasets (PREFIX.bin/.idx) into one. `python tools/merge_datasets.py --help`.

The code is megaphi.cli.merge_datasets, installed as the `megaphi-merge-datasets` command.
"""
import sys

from megaphi.cli import merge_datasets as _tool
from megaphi.cli import tool_wrapper_namespace

globals().update(tool_wrapper_namespace(_tool))

if __name__ == "__main__":
    sys.exit(_tool.main())

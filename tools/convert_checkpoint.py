#!/usr/bin/env python
"""Convert phi checkpoints between Hugging Face and megaphi, and reshard training checkpoints. `python tools/convert_checkpoint.py --help`.

The code is megaphi.cli.convert_checkpoint, installed as the `megaphi-convert` command.
"""
import sys

from megaphi.cli import convert_checkpoint as _tool
from megaphi.cli import tool_wrapper_namespace

globals().update(tool_wrapper_namespace(_tool))

if __name__ == "__main__":
    sys.exit(_tool.main())

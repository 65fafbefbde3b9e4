#!/usr/bin/env python
"""Convert phi checkpoints between Hugging Face and megaphi, and reshard training checkpoints. `python tools/convert_checkpoint.py --help`.

The code is megaphi/cli/convert_checkpoint.py, installed as the `megaphi-convert` command; this file runs it as its own module.
"""
from megaphi.cli import exec_tool

exec_tool("convert_checkpoint", globals())

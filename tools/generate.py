#!/usr/bin/env python
"""Generate completions from a model folder or checkpoint. `python tools/generate.py --help`.

The code is megaphi/cli/generate.py, installed as the `megaphi-generate` command; this file runs it as its own module.
"""
from megaphi.cli import exec_tool

exec_tool("generate", globals())

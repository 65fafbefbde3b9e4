#!/usr/bin/env python
"""Evaluate a model on HumanEval (pass@k), or score a completions file. `python tools/eval_humaneval.py --help`.

The code is megaphi/cli/eval_humaneval.py, installed as the `megaphi-eval` command; this file runs it as its own module.
"""
from megaphi.cli import exec_tool

exec_tool("eval_humaneval", globals())

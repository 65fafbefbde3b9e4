#!/usr/bin/env python
"""Draw the loss and learning-rate curves of a training run to a PNG. `python tools/plot_metrics.py --help`.

The code is megaphi/cli/plot_metrics.py, installed as the `megaphi-plot` command; this file runs it as its own module.
"""
from megaphi.cli import exec_tool

exec_tool("plot_metrics", globals())

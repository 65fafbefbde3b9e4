#!/usr/bin/env python
"""Draw the loss and learning-rate curves of a training run to a PNG: `python tools/plot_metrics.py RUN_DIR`.

The code is megaphi.cli.plot_metrics, installed as the `megaphi-plot` command.
"""
import sys

from megaphi.cli import plot_metrics as _tool
from megaphi.cli import tool_wrapper_namespace

globals().update(tool_wrapper_namespace(_tool))

if __name__ == "__main__":
    sys.exit(_tool.main())

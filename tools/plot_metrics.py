#!/usr/bin/env python
"""Draw the loss and learning-rate curves of a training run to a PNG. `python tools/plot_metrics.py --help`.

A wrapper: the command is megaphi/cli/plot_metrics.py, also installed as `megaphi-plot`; this file calls its main().
"""

import sys

from megaphi.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())

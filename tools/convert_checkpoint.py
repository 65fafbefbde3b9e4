#!/usr/bin/env python
"""Convert phi checkpoints between Hugging Face and megaphi, and reshard training checkpoints. `python tools/convert_checkpoint.py --help`.

A wrapper: the command is megaphi/cli/convert_checkpoint.py, also installed as `megaphi-convert`; this file calls its main().
"""

import sys

from megaphi.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())

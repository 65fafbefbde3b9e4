#!/usr/bin/env python
"""Concatenate several MMIDIDX datasets (PREFIX.bin/.idx) into one. `python tools/merge_datasets.py --help`.

A wrapper: the command is megaphi/cli/merge_datasets.py, also installed as `megaphi-merge-datasets`; this file calls its main().
"""

import sys

from megaphi.cli.merge_datasets import main

if __name__ == "__main__":
    sys.exit(main())

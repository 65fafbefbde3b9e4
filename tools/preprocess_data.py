#!/usr/bin/env python
"""Turn a corpus (JSONL, parquet, HF datasets, source trees) into Megatron .bin/.idx token files. `python tools/preprocess_data.py --help`.

A wrapper: the command is megaphi/cli/preprocess_data.py, also installed as `megaphi-preprocess`; this file calls its main().
"""

import sys

from megaphi.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())

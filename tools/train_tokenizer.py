#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on a corpus, offline. `python tools/train_tokenizer.py --help`.

A wrapper: the command is megaphi/cli/train_tokenizer.py, also installed as `megaphi-train-tokenizer`; this file calls its main().
"""

import sys

from megaphi.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())

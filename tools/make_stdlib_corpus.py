#!/usr/bin/env python
"""Turn the Python standard library's sources into a JSONL corpus. `python tools/make_stdlib_corpus.py --help`.

A wrapper: the command is megaphi/cli/make_stdlib_corpus.py, also installed as `megaphi-stdlib-corpus`; this file calls its main().
"""

import sys

from megaphi.cli.make_stdlib_corpus import main

if __name__ == "__main__":
    sys.exit(main())

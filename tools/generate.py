#!/usr/bin/env python
"""Generate completions from a model folder or checkpoint. `python tools/generate.py --help`.

A wrapper: the command is megaphi/cli/generate.py, also installed as `megaphi-generate`; this file calls its main().
"""

import sys

from megaphi.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())

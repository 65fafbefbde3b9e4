#!/usr/bin/env python
"""Evaluate a model on HumanEval (pass@k), or score a completions file. `python tools/eval_humaneval.py --help`.

A wrapper: the command is megaphi/cli/eval_humaneval.py, also installed as `megaphi-eval`; this file calls its main().
"""

import sys

from megaphi.cli.eval_humaneval import main

if __name__ == "__main__":
    sys.exit(main())

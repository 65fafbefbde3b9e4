"""HumanEval-style evaluation: problem readers, scoring in the sandbox, pass@k.

from megaphi.evaluation.humaneval import evaluate_model      # the training-loop hook
from megaphi.evaluation.problems import load_problem_set     # "humaneval", "humaneval:N", a file
from megaphi.evaluation.pass_at_k import pass_at_k
from megaphi.sandbox import Sandbox                          # run untrusted programs (its own package)
"""

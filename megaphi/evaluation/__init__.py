"""HumanEval-style evaluation: problem readers, sandboxed execution, pass@k.

    from megaphi.evaluation.humaneval import evaluate_model      # the training-loop hook
    from megaphi.evaluation.problems import load_problem_set     # "humaneval", "humaneval:N", a file
    from megaphi.evaluation.sandbox import Sandbox               # run untrusted programs
    from megaphi.evaluation.pass_at_k import pass_at_k
"""

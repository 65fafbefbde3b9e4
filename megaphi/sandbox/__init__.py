"""Process isolation for untrusted Python programs (model completions and their tests).

    from megaphi.sandbox import Sandbox, SandboxLimits
    with Sandbox(SandboxLimits(timeout_seconds=3.0), workers=4) as sandbox:
        result = sandbox.run_with_marker(program)       # an ExecutionResult
        results = sandbox.run_many(programs)

Inside: host.py (the Sandbox), worker.py (the worker process, run as
`python -m megaphi.sandbox.worker`), protocol.py (the messages both exchange), and the pieces
either side builds on: worker_process.py, uid_pool.py, folders.py, results.py on the host;
namespaces.py, cgroups.py, runner.py, program.py, syscall_filter.py, linux.py in the worker.
docs/evaluation.md lists the guarantees and where each holds.
"""
from .host import Sandbox
from .results import ExecutionResult, SandboxLimits

__all__ = ["Sandbox", "SandboxLimits", "ExecutionResult"]

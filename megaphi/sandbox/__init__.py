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

from typing import TYPE_CHECKING

from .results import ExecutionResult, SandboxLimits

if TYPE_CHECKING:
    from .host import Sandbox

__all__ = ["Sandbox", "SandboxLimits", "ExecutionResult"]


def __getattr__(name):
    # Sandbox is imported on first use: `python -m megaphi.sandbox.worker` imports this package
    # first, and the host side's modules in the worker would sit in every program's memory and
    # make each fork slower.
    if name == "Sandbox":
        from .host import Sandbox

        return Sandbox
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

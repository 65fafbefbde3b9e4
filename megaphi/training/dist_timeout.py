"""--distributed-timeout-minutes: how long a collective may wait for the other ranks.

Without it a rank that is stopped (SIGSTOP), hung or dead blocks the others for the backend's
default (30 minutes for gloo) with no message. The timeout is given to init_process_group and made
the default of every later process group (torch reads `default_pg_timeout` /
`default_pg_nccl_timeout` when a group is created without a timeout): the tensor/data-parallel groups
of megaphi.parallel, the train loop's CPU control group and DeepSpeed's groups all get it. A
collective that times out raises in the waiting ranks; `timeout_message` turns that exception into
one line naming the timeout and the flag. (With NCCL, torch's watchdog may abort the process itself
after the same timeout, printing its own "Watchdog caught collective operation timeout" line.)
"""

import re
from datetime import timedelta
from typing import Optional

FLAG = "--distributed-timeout-minutes"
DEFAULT_MINUTES = 10.0  # Megatron-LM's default

_TIMEOUT_TEXT = re.compile(r"timed?[ -]?out|timeout|deadline exceeded", re.IGNORECASE)


def set_default_timeout(minutes: float) -> timedelta:
    """The timedelta for init_process_group; also the default of every group created afterwards."""
    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(minutes=float(minutes))
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)
    return timeout


def is_timeout(exc: BaseException) -> bool:
    """A collective or the rendezvous gave up waiting for other ranks."""
    return isinstance(exc, RuntimeError) and bool(_TIMEOUT_TEXT.search(str(exc)))


def timeout_message(exc: BaseException, minutes: float, rank: Optional[int] = None) -> str:
    """One line: what timed out, the limit and the flag, and the backend's own first line."""
    detail = " ".join(str(exc).split())[:300]
    where = f"rank {rank}: " if rank is not None else ""
    return (
        f"{where}a distributed operation waited longer than {FLAG} {minutes:g} ({minutes * 60:g} s) for "
        f"the other ranks: a rank is stopped, hung or dead; raise {FLAG} if a step legitimately takes "
        f"longer ({type(exc).__name__}: {detail})"
    )

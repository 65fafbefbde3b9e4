"""Where the training command's lines go: results and progress on stdout, warnings and notes on stderr
(DeepSpeed's own log lines included), errors on stderr under one prefix (argument_error.ERROR_PREFIX)."""

import contextlib
import logging
import sys


def say_rank0(text):
    """A line from rank 0: on stderr when it is a warning, else on stdout."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    warning = text.lower().startswith("warning:")
    print(text, file=sys.stderr if warning else sys.stdout, flush=True)


def deepspeed_logs_to_stderr():
    """DeepSpeed logs (accelerator detection, memory dumps, config warnings) through a handler bound to
    stdout when its logging module is first imported: import it with stdout pointing at stderr, and
    move a handler made earlier. Training's stdout then holds megaphi's own lines only."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401  (the first import detects the accelerator and may log)
        from deepspeed.utils import logger
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)

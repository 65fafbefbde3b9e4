"""SIGTERM/SIGINT: let the current step finish, then save and exit cleanly.

The handler only records the signal; the train loop polls `should_stop()` after each step. Ranks agree
through an all-reduce (a launcher may deliver the signal to one rank first), so they all save together.
The death of the rank's launcher counts as a signal too (training.launcher_watch: `should_stop()` polls
the armed watch, so a rank whose `deepspeed`/`torchrun` parent went away saves and stops).
"""

import signal

import torch


class GracefulExit:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, watch=None):
        from .launcher_watch import current

        self.received = None
        self.reason = None  # set when the launcher went away (no signal number)
        self.watch = watch if watch is not None else current()
        self._previous = {}

    def _handler(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            # a second Ctrl-C means "now": restore the default behaviour and raise
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals cannot be handled here
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    @property
    def signal_name(self):
        if self.reason is not None:
            return self.reason
        return signal.Signals(self.received).name if self.received is not None else None

    def should_stop(self, group=None, device=None):
        """True on every rank once any rank has received a signal (collective call)."""
        if self.received is None and self.reason is None and self.watch is not None:
            self.reason = self.watch.gone()
        stop = self.received is not None or self.reason is not None
        flag = torch.tensor([1.0 if stop else 0.0], device=device)
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size(group) > 1
        ):
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        return bool(flag.item() > 0)

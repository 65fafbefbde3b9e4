"""Pretrain or finetune a phi-1-class model: `python -m megaphi.pretrain --help`.

Runs under the `deepspeed` launcher, `torchrun`, or as one plain process (a 1-rank group is made).
The launcher only: flags -> RunConfig (megaphi.training.config) -> Trainer(config).train()
(megaphi.training.trainer), and each failure as one error line with its exit status.
"""

import errno
import os
import sys

import torch.distributed as dist

from megaphi.checkpoint import layout, lock
from megaphi.training import dist_timeout, launcher_watch, peer_loss
from megaphi.training.argument_error import ERROR_PREFIX, ArgumentError, FlagError
from megaphi.training.arguments import parse_flags
from megaphi.training.config import resolve_config
from megaphi.training.process_group import init_distributed
from megaphi.training.train_loop import TrainingError


def _error(message):
    print(f"{ERROR_PREFIX} {message}", file=sys.stderr, flush=True)


def main(argv=None):
    from megaphi.checkpoint.reshard import TensorParallelMismatchError

    config, peers = None, []
    try:
        config = resolve_config(parse_flags(argv))
        if int(os.environ.get("RANK", "0")) == 0:
            for note in config.logging.notes:
                print(f"note: {note}", file=sys.stderr, flush=True)
        launcher_watch.arm()  # under a launcher: stop (and save) when it goes away
        init_distributed(config.parallel.distributed_backend, config.parallel.distributed_timeout_minutes)
        peers = peer_loss.record_peers()
        return run(config)
    except FlagError as e:
        _error(e)
        return 2
    except (ArgumentError, TrainingError, layout.CheckpointError, TensorParallelMismatchError) as e:
        _error(e)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _error(f"disk full (ENOSPC): {e.strerror}: {e.filename or ''}")
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without the save the first one asked for
        _error(
            "interrupted by a second Ctrl-C; stopped without saving (a save in progress is left incomplete "
            "and never counts as a checkpoint; 'latest' is unchanged)"
        )
        return 130
    except RuntimeError as e:
        rank = dist.get_rank() if dist.is_initialized() else None
        timeout = config.parallel.distributed_timeout_minutes if config else None
        if dist_timeout.is_timeout(e):
            message = dist_timeout.timeout_message(e, timeout, rank)
        elif peer_loss.is_peer_lost(e) and rank is not None:
            message = peer_loss.peer_lost_message(e, peers, rank, config.checkpoint.save if config else None)
        else:
            raise
        _error(message)
        sys.stdout.flush()
        os._exit(1)  # the group is unusable: tearing it down could wait on the missing rank again
    finally:
        from megaphi.parallel import destroy_model_parallel

        destroy_model_parallel()
        lock.release_all()
        if dist.is_initialized():
            dist.destroy_process_group()


def run(config):
    """Train (or evaluate) the resolved run in the process group already made."""
    from megaphi.training.trainer import Trainer

    Trainer(config).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())

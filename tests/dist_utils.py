"""Run a function on N CPU processes with the gloo backend (multi-rank tests)."""

import os
import socket
import sys
import tempfile
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, store_path, fn, args, results):
    # MASTER_* are set for code that reads them (DeepSpeed); the group itself rendezvouses through a
    # file, so concurrent test runs can never collide on a TCP port.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    import torch

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size, timeout=timedelta(seconds=300)
        )
        fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        results.put(("failed", rank, traceback.format_exc()))
        sys.stderr.flush()
        os._exit(1)
    results.put(("ok", rank, ""))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: communication threads of the backend can abort in static
    # destructors after a fully successful run, which would turn a passed test into a crash.
    os._exit(0)


def run_distributed(fn, world_size, *args):
    """Spawn world_size processes running fn(rank, world_size, *args); re-raise the first failure.

    fn must be a module-level function (it is pickled). Results come back through files or a
    multiprocessing queue the test passes in args.
    """
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="megaphi-dist-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, store_path, fn, args, results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    outcomes, failures = {}, []
    while not results.empty():
        status, rank, tb = results.get()
        outcomes[rank] = status
        if status == "failed":
            failures.append((rank, tb))  # arrival order: the first is the root cause, the rest follow from it
    if failures:
        rank, tb = failures[0]
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    missing = [r for r in range(world_size) if r not in outcomes]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise AssertionError(f"ranks {missing} did not finish (exit codes {codes}; timed out or crashed)")

#!/usr/bin/env python
"""Pipeline step time and bubble for 1F1B and interleaved 1F1B, against the theory.

P gloo processes run megaphi.parallel.pipeline's schedules (real batched point-to-point transfers,
real executor) on one of two kinds of stage work:

  model   phi-1 decoder layers (hidden --hidden, --layers-per-stage layers, float32, one thread per
          process): real compute. Needs P free cores to mean anything, since stages must run at
          the same time; communication is [micro, seq, hidden] per boundary, far below the work.
  sleep   each stage's forward sleeps --forward-ms and its backward twice that (split over the v
          chunks when interleaved): the schedule's own bubble, independent of how many cores the
          machine has free, with the real transfers between stages.

  stage ms   forward + backward time of one micro-batch on a stage, measured inside the step (the
             schedule's compute_seconds / m, mean over stages); m of them is the ideal step
  step ms    measured step (median over --iters, or the fastest with --best; slowest rank)
  bubble     1 - compute / step, mean over stages: the idle share of the step, waiting for
             transfers included (the simulated schedule with free communication gives exactly
             the theory, tests/parallel/test_pipeline_plan.py)
  theory     (P - 1) / (m + P - 1) for 1F1B; ((P - 1) / v) / (m + (P - 1) / v) interleaved

Usage: python benchmarks/pipeline.py [--work sleep model] [--pp 2 4] [--micro-batches 4 8]
       [--chunks 2] [--forward-ms 20] [--model-pp 2] [--json out.json]
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        time.sleep(forward_s)
        ctx.backward_s = backward_s
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class SleepChunk(torch.nn.Module):
    """A stage whose work is a fixed sleep: same interface as megaphi's PipelineStage."""

    def __init__(self, shape, forward_s, holds_embedding, holds_loss):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.shape, self.forward_s = shape, forward_s
        self.holds_embedding, self.holds_loss = holds_embedding, holds_loss
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, input_ids=None, labels=None, reduction="none"):
        x = self.weight * torch.ones(self.shape) if self.holds_embedding else self.input_tensor
        return _Sleep.apply(x, self.forward_s, 2 * self.forward_s), None


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output, _ = model(batch["tokens"], labels=batch["labels"], reduction="none")
    return output, lambda out: (out.mean(), {})


def _chunks(args, work, rank, P, v):
    from megaphi.config import PhiConfig
    from megaphi.parallel.pipeline import build_model_chunks

    shape = (args.micro_batch, args.seq, args.hidden)
    if work == "sleep":
        last = P * v - 1
        return [
            SleepChunk(shape, args.forward_ms / 1000.0 / v, c * P + rank == 0, c * P + rank == last) for c in range(v)
        ]
    config = PhiConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers_per_stage * P,
        num_attention_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
        attention_dropout=0.0,
        resid_dropout=0.0,
        embd_dropout=0.0,
    )
    return [c.train() for c in build_model_chunks(config, rank, P, v, init_seed=1)]


def _batches(args, m):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 1024, (m, args.micro_batch, args.seq + 1), generator=g)
    return [{"tokens": d[:, :-1], "labels": d[:, 1:]} for d in data]


def _reduce(value, op):
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.item()


def _worker(rank, world, port, store, args, work, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from megaphi.parallel import state
    from megaphi.parallel.pipeline import StageCommunicator, forward_backward_pipelining

    state.initialize_model_parallel(1, world)
    shape = (args.micro_batch, args.seq, args.hidden)
    comm = StageCommunicator(shape, torch.float32)
    rows = []
    for m in args.micro_batches:
        for v in (1, args.chunks):
            if v > 1 and m % world:
                continue
            chunks = _chunks(args, work, rank, world, v)
            batches = _batches(args, m)
            steps = []
            for i in range(args.iters + 1):  # the first step warms up allocators and threads
                dist.barrier()
                stats = {}
                start = time.perf_counter()
                forward_backward_pipelining(
                    _forward_step, [iter(batches) for _ in chunks], chunks, m, comm, stats=stats
                )
                elapsed = _reduce(time.perf_counter() - start, dist.ReduceOp.MAX)
                compute = _reduce(stats["compute_seconds"], dist.ReduceOp.SUM) / world
                for chunk in chunks:
                    chunk.zero_grad(set_to_none=True)
                if i:
                    steps.append((elapsed, compute))
            step_s, compute_s = min(steps, key=lambda s: s[0]) if args.best else sorted(steps)[len(steps) // 2]
            ideal_bubble = (world - 1) / v
            rows.append(
                dict(
                    work=work,
                    schedule="1F1B" if v == 1 else "interleaved",
                    P=world,
                    v=v,
                    m=m,
                    stage_ms=1000 * compute_s / m,
                    step_ms=1000 * step_s,
                    bubble=1.0 - compute_s / step_s,
                    theory=ideal_bubble / (m + ideal_bubble),
                )
            )
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    state.destroy_model_parallel()
    dist.destroy_process_group()


def run(args, work, P):
    with tempfile.TemporaryDirectory(prefix="megaphi-pp-bench-") as tmp:
        out_path = os.path.join(tmp, "rows.json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(P, port, os.path.join(tmp, "store"), args, work, out_path), nprocs=P, join=True)
        with open(out_path) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", nargs="+", default=["sleep", "model"], choices=["sleep", "model"])
    parser.add_argument("--pp", nargs="+", type=int, default=[2, 4], help="pipeline sizes for sleep work")
    parser.add_argument(
        "--model-pp", nargs="+", type=int, default=[2], help="pipeline sizes for model work (at most the free cores)"
    )
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--chunks", type=int, default=2, help="virtual stages per rank for the interleaved rows")
    parser.add_argument("--forward-ms", type=float, default=20.0)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers-per-stage", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument(
        "--best",
        action="store_true",
        help="report the fastest step instead of the median (on a machine shared with other work)",
    )
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    if args.layers_per_stage % args.chunks:
        parser.error(f"--layers-per-stage {args.layers_per_stage} must be a multiple of --chunks {args.chunks}")
    rows = []
    for work in args.work:
        for P in args.pp if work == "sleep" else args.model_pp:
            rows += run(args, work, P)
    header = (
        f"{'work':6} {'schedule':12} {'P':>2} {'v':>2} {'m':>3} {'stage ms':>9} {'step ms':>9} "
        f"{'bubble':>7} {'theory':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['work']:6} {r['schedule']:12} {r['P']:>2} {r['v']:>2} {r['m']:>3} {r['stage_ms']:>9.1f} "
            f"{r['step_ms']:>9.1f} {r['bubble']:>7.3f} {r['theory']:>7.3f}"
        )
    print(json.dumps(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

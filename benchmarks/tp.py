#!/usr/bin/env python
"""Tensor-parallel communication volume per layer per step, counted, for TP 1/2/4/8 with and without
sequence parallel; and the step time of that layer.

One phi-1-shaped block (hidden 2048, MLP 8192, 32 heads; --preset phi-1-small for the small one) runs
forward + backward on TP processes (gloo on CPU; NCCL when CUDA has >= TP GPUs) at a reduced sequence
length. Every collective issued by megaphi.parallel.mappings is counted
(megaphi.parallel.mappings.count_communication); the table shows

  calls       all-reduce / all-gather / reduce-scatter calls per layer per step (forward + backward)
  counted     bytes of the tensors those collectives reduce or produce, at the run's shape and dtype
  phi-1 s=2048 the counted bytes scaled to batch 1 x 2048 tokens in bf16 (communication is linear in
              tokens), next to the closed-form value for the same shapes:
                 TP:      3 all-reduces of b*s*h      (2 row-layer outputs forward, 1 shared block-input
                                                       gradient backward)
                 TP + SP: 3 all-gathers + 3 reduce-scatters of b*s*h, plus 4 all-reduces of h
                          (LayerNorm weight/bias, row biases: gradients on sequence shards)
  ring/rank   bytes each rank sends with ring algorithms: all-reduce 2(t-1)/t x N, all-gather and
              reduce-scatter (t-1)/t x N: equal for TP and TP+SP, as in Megatron
  copied      bytes written by copying ops (copy_, clone, cat, stack, dtype casts) during the layer's
              forward + backward on one rank, whoever issues them (the model, autograd, the attention
              kernel's fallback): the memory traffic that layout changes cost. Sequence parallel keeps
              activations [seq, batch, hidden], so its collectives copy nothing at any batch size; run
              with --batch > 1 to see it
  step ms     measured forward+backward time of the layer on this machine (CPU gloo processes here:
              a check that it runs, not a GPU figure; on a multi-GPU machine it is NCCL on GPUs)

Usage: python benchmarks/tp.py [--tp 1 2 4 8] [--seq 32] [--batch 1] [--preset phi-1] [--iters 2]
"""

import argparse
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaphi.config import get_preset  # noqa: E402

FULL_SEQ, FULL_BYTES_PER_ELEMENT = 2048, 2  # phi-1 training: 2048 tokens, bf16/fp16 activations


COPY_OPS = {"copy_", "clone", "cat", "stack", "_to_copy"}


class CopiedBytes(TorchDispatchMode):
    """Bytes written by copying ops while active (the destination of copy_, the result of the others)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in COPY_OPS:
            written = args[0] if func.__name__.startswith("copy_") else out
            if isinstance(written, torch.Tensor):
                self.bytes += written.numel() * written.element_size()
        return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, args, sp, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if use_cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    try:
        from megaphi.model.phi import PhiDecoderLayer
        from megaphi.ops import rotary_tables
        from megaphi.parallel import initialize_model_parallel
        from megaphi.parallel.layers import init_from_master
        from megaphi.parallel.mappings import count_communication

        initialize_model_parallel(world)
        device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
        dtype = torch.bfloat16 if use_cuda else torch.float32
        config = get_preset(args.preset, attention_dropout=0.0, resid_dropout=0.0)
        layer = PhiDecoderLayer(config, 0, device=device, dtype=dtype).train()
        for p in layer.parameters():
            if p.dim() == 2:
                init_from_master(p, lambda t, g: t.normal_(0, 0.02, generator=g), torch.Generator().manual_seed(0))
        cos, sin = (t.to(device=device, dtype=dtype) for t in rotary_tables(config.rotary_dim, args.seq, device=device))
        local_seq = args.seq // world if sp else args.seq
        # the block's input: [batch, seq, hidden], or under SP this rank's [seq/TP, batch, hidden]
        shape = (local_seq, args.batch) if sp else (args.batch, local_seq)
        x = torch.randn(
            *shape,
            config.hidden_size,
            device=device,
            dtype=dtype,
            generator=torch.Generator(device=device).manual_seed(rank if sp else 0),
            requires_grad=True,
        )

        def step():
            layer(x, cos, sin, None, None, sp).float().square().mean().backward()

        step()  # warm-up
        with count_communication() as counter, CopiedBytes() as copied:
            step()
        if use_cuda:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        if use_cuda:
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / args.iters
        if rank == 0:
            torch.save(
                {
                    "calls": dict(counter.calls),
                    "bytes": dict(counter.bytes),
                    "copied": copied.bytes,
                    "ms": elapsed * 1e3,
                    "element_size": torch.empty(0, dtype=dtype).element_size(),
                    "backend": "nccl/GPU" if use_cuda else "gloo/CPU",
                },
                out_path,
            )
    finally:
        dist.destroy_process_group()


def measure(tp, sp, args):
    if tp == 1:
        sp = False
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.start_processes(_worker, args=(tp, _free_port(), args, sp, out), nprocs=tp, start_method="spawn")
        return torch.load(out)


def formula(tp, sp, config, batch, seq, element_size):
    """(message bytes, ring bytes sent per rank) per layer per step, closed form."""
    if tp == 1:
        return 0, 0
    n = batch * seq * config.hidden_size * element_size
    f = (tp - 1) / tp
    if sp:
        small = 4 * config.hidden_size * element_size
        return 6 * n + small, 6 * f * n + 2 * f * small
    return 3 * n, 6 * f * n


def _mb(b):
    return f"{b / 2**20:,.3f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seq", type=int, default=32, help="sequence length of the measured run (divisible by TP)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--preset", default="phi-1", choices=["phi-1", "phi-1-small"])
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args()
    config = get_preset(args.preset)
    print(
        f"{args.preset} block (h={config.hidden_size}, ffn={config.intermediate_size}, "
        f"heads={config.num_attention_heads}), measured at batch {args.batch} x seq {args.seq}; "
        f"'phi-1 s=2048' = batch 1 x {FULL_SEQ} tokens, bf16"
    )
    header = (
        "| TP | SP | calls AR/AG/RS | counted (run) | counted -> s=2048 bf16 | formula s=2048 bf16 "
        "| ring bytes/rank (formula) | copied (run) | step ms | backend |"
    )
    print(header)
    print("|" + "---|" * 10)
    for tp in args.tp:
        for sp in (False,) if tp == 1 else (False, True):
            r = measure(tp, sp, args)
            calls = "/".join(str(r["calls"].get(op, 0)) for op in ("all_reduce", "all_gather", "reduce_scatter"))
            counted = sum(r["bytes"].values())
            # scale the b*s*h collectives by tokens and dtype; the h-sized ones (SP parameter grads) by dtype only
            small = 4 * config.hidden_size * r["element_size"] if sp and tp > 1 else 0
            scaled = (
                ((counted - small) * (FULL_SEQ / (args.batch * args.seq)) + small)
                * FULL_BYTES_PER_ELEMENT
                / r["element_size"]
            )
            message, ring = formula(tp, sp, config, 1, FULL_SEQ, FULL_BYTES_PER_ELEMENT)
            print(
                f"| {tp} | {'on' if sp else 'off'} | {calls} | {_mb(counted)} | {_mb(scaled)} | {_mb(message)} "
                f"| {_mb(ring)} | {_mb(r['copied'])} | {r['ms']:.1f} | {r['backend']} |",
                flush=True,
            )
    print("Step time on GPUs needs a machine with >= TP GPUs (NCCL); the CPU figures above only show the runs work.")


if __name__ == "__main__":
    main()

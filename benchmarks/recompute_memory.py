"""Activation memory held between forward and backward, per --recompute-granularity.

Deterministic (no timing, no allocator): during the forward every tensor autograd saves for the
backward is recorded (torch.autograd.graph.saved_tensors_hooks), plus the inputs that an activation
checkpoint keeps to recompute from; the figure is the bytes of the distinct storages among them,
parameters excluded. Prints a table (per decoder layer) and a JSON line.

    python benchmarks/recompute_memory.py                            # hidden 256, 4 heads x 64, seq 512
    python benchmarks/recompute_memory.py --backend math --dtype bfloat16
"""

import argparse
import json
from contextlib import contextmanager

import torch

GRANULARITIES = ("none", "selective", "full")


@contextmanager
def held_storages(model):
    """Yields a dict storage-pointer -> bytes that fills up with what the forward keeps."""
    import megaphi.model.phi as phi

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held = {}

    def hold(tensor):
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in params:
            storage = tensor.untyped_storage()
            held[storage.data_ptr()] = storage.nbytes()

    def pack(tensor):
        hold(tensor)
        return tensor

    original = phi.checkpoint

    def checkpoint_holding_inputs(function, *args):
        for arg in args:  # what the checkpoint recomputes from stays alive until the backward
            hold(arg)
        return original(function, *args)

    phi.checkpoint = checkpoint_holding_inputs
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield held
    finally:
        phi.checkpoint = original


def measure(granularity, args):
    from megaphi.config import PhiConfig
    from megaphi.model import ModelRuntime, PhiForCausalLM

    config = PhiConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        rotary_dim=32,
        max_position_embeddings=args.seq,
        attention_dropout=args.dropout,
        resid_dropout=args.dropout,
        embd_dropout=0.0,
    )
    runtime = ModelRuntime(recompute=granularity, attention_backend=args.backend)
    model = PhiForCausalLM(config, init_seed=0, runtime=runtime).to(getattr(torch, args.dtype)).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    with held_storages(model) as held:
        loss, _ = model(ids[:, :-1], labels=ids[:, 1:])
    total = sum(held.values())
    loss.backward()  # the graph is complete: what was held is what the backward reads
    return total


def per_layer(args, granularity, total):
    """Bytes one decoder layer adds: the run minus the same run with one layer fewer."""
    fewer = measure(granularity, argparse.Namespace(**{**vars(args), "layers": args.layers - 1}))
    return total - fewer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="auto", help="--attention-backend (auto, math, sdpa-flash, ...)")
    args = parser.parse_args()
    torch.manual_seed(0)
    totals = {g: measure(g, args) for g in GRANULARITIES}
    layers = {g: per_layer(args, g, t) for g, t in totals.items()}
    unit = args.batch * args.seq * args.hidden * torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(
        f"hidden {args.hidden}, {args.hidden // 64} heads x 64, seq {args.seq}, batch {args.batch}, "
        f"{args.dtype}, dropout {args.dropout}, attention {args.backend}, {args.layers} layers\n"
    )
    print("| recompute | held per layer (MiB) | in units of b*s*h | whole model (MiB) |")
    print("|---|---|---|---|")
    for g in GRANULARITIES:
        print(f"| {g} | {layers[g] / 2**20:.2f} | {layers[g] / unit:.2f} | {totals[g] / 2**20:.2f} |")
    print(json.dumps({"args": vars(args), "total_bytes": totals, "per_layer_bytes": layers, "bsh_bytes": unit}))


if __name__ == "__main__":
    main()

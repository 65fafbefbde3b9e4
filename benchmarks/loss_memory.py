"""Peak memory of the lm_head + cross-entropy step: full logits vs --loss-chunk-tokens.

Each mode runs in its own process (so peaks do not mix): forward and backward of
lm_head + per-token cross entropy on [tokens, hidden] activations. On CUDA the figure is
torch.cuda.max_memory_allocated above the inputs; on CPU the growth of the peak resident set
(ru_maxrss) above the inputs. Prints a table and a JSON line.

    python benchmarks/loss_memory.py                                   # CPU, fp32, 4096 tokens
    python benchmarks/loss_memory.py --device cuda --dtype bfloat16 --tokens 16384 --hidden 2048
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def measure(args, chunk):
    from megaphi.parallel.cross_entropy import chunked_linear_cross_entropy, vocab_parallel_cross_entropy

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(args.tokens, args.hidden, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if chunk:
        losses = chunked_linear_cross_entropy(hidden, weight, None, labels, chunk)
    else:
        losses = vocab_parallel_cross_entropy(torch.nn.functional.linear(hidden, weight), labels)
    losses.mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "chunk_tokens": chunk,
        "peak_extra_gib": peak / 2**30,
        "seconds": time.perf_counter() - start,
        "loss": losses.mean().item(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=51200)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 4096, 1024])
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args, args.child)))
        return
    rows = []
    for chunk in args.chunks:
        cmd = [
            sys.executable,
            __file__,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--tokens",
            str(args.tokens),
            "--hidden",
            str(args.hidden),
            "--vocab",
            str(args.vocab),
            "--child",
            str(chunk),
        ]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    full = rows[0]["peak_extra_gib"] if rows and rows[0]["chunk_tokens"] == 0 else None
    print(
        f"lm_head + cross entropy, forward + backward: {args.tokens} tokens x hidden {args.hidden} -> vocab "
        f"{args.vocab}, {args.dtype} on {args.device}\n"
    )
    print("| loss | peak memory above inputs (GiB) | vs full logits | seconds | mean loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = "full logits" if r["chunk_tokens"] == 0 else f"chunks of {r['chunk_tokens']} tokens"
        ratio = f"{r['peak_extra_gib'] / full:.2f}x" if full else "-"
        print(f"| {name} | {r['peak_extra_gib']:.2f} | {ratio} | {r['seconds']:.1f} | {r['loss']:.6f} |")
    result = {"config": vars(args), "rows": rows}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Throughput of megaphi's fused LayerNorm and rotary kernels against torch eager, torch.compile and
apex (where installed), beside the GPU's measured device-to-device copy bandwidth.

    python benchmarks/kernels.py                      # phi-1 shapes: 16k tokens x 2048, heads 32 x 64, rotary 32
    python benchmarks/kernels.py --tokens 4096 --no-compile

GB/s counts the bytes an op must move once (reads + writes):
  LN forward   x, weight, bias read; y written; fp32 mean and rstd written
  LN backward  dy, x, weight, mean, rstd read; dx, dweight, dbias written
  rotary       out of place: q, k read and written whole; in place: only the rotary dims
Targets (H200): LN forward and rotary >= 85% of copy bandwidth; LN forward+backward >= 2x torch eager.
Needs a CUDA GPU; without one it prints why and exits.
"""

import argparse
import sys

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384, help="rows (batch * seq) for LayerNorm and rotary")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rotary-dim", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048, help="sequence length for rotary (tokens / seq = batch)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    p.add_argument("--json", metavar="PATH", help="also write the rows and the copy bandwidth here")
    return p.parse_args(argv)


def time_ms(fn, iters, warmup):
    """Median milliseconds per call over `iters` calls, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(iters, warmup):
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters, warmup)
    return 2 * src.numel() / ms / 1e6  # GB/s


def maybe_compile(fn, args):
    if args.no_compile:
        return None, "skipped (--no-compile)"
    try:
        return torch.compile(fn), None
    except Exception as exc:  # report, don't fail the benchmark
        return None, f"{type(exc).__name__}: {exc}"


def apex_layer_norm():
    from megaphi.ops import backend

    return backend.apex_layer_norm(), backend.apex_unavailable_reason()


def layer_norm_rows(args, dtype):
    from megaphi.ops import layer_norm

    n, h = args.tokens, args.hidden
    size = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(n, h, device="cuda", dtype=dtype)
    w = torch.rand(h, device="cuda", dtype=dtype) + 0.5
    b = torch.randn(h, device="cuda", dtype=dtype)
    dy = torch.randn(n, h, device="cuda", dtype=dtype)
    fwd_bytes = (2 * n * h + 2 * h) * size + 2 * 4 * n
    bwd_bytes = (3 * n * h + 3 * h) * size + 2 * 4 * n

    impls = {
        "megaphi cuda": lambda a, c, d: layer_norm(a, c, d, 1e-5, impl="cuda"),
        "torch eager": lambda a, c, d: F.layer_norm(a, (h,), c, d, 1e-5),
    }
    compiled, why = maybe_compile(lambda a, c, d: F.layer_norm(a, (h,), c, d, 1e-5), args)
    impls["torch.compile"] = compiled or why
    apex_fn, apex_why = apex_layer_norm()
    impls["apex FusedLayerNorm"] = (lambda a, c, d: apex_fn(a, c, d, (h,), 1e-5)) if apex_why is None else apex_why

    rows = []
    xg, wg, bg = x.clone().requires_grad_(True), w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    for name, fn in impls.items():
        if isinstance(fn, str):
            rows.append(("LN fwd", name, None, None, fn))
            continue
        with torch.no_grad():
            ms_fwd = time_ms(lambda: fn(x, w, b), args.iters, args.warmup)

        def fwd_bwd():
            xg.grad = wg.grad = bg.grad = None
            fn(xg, wg, bg).backward(dy)

        ms_both = time_ms(fwd_bwd, args.iters, args.warmup)
        rows.append(("LN fwd", name, ms_fwd, fwd_bytes, None))
        rows.append(("LN fwd+bwd", name, ms_both, fwd_bytes + bwd_bytes, None))
    return rows


def rotary_rows(args, dtype):
    from megaphi.ops import apply_rotary_qk, rotary_tables

    batch, seq = max(1, args.tokens // args.seq), args.seq
    shape = (batch, seq, args.heads, args.head_dim)
    size = torch.tensor([], dtype=dtype).element_size()
    q = torch.randn(shape, device="cuda", dtype=dtype)
    k = torch.randn(shape, device="cuda", dtype=dtype)
    cos, sin = rotary_tables(args.rotary_dim, seq, device="cuda")
    numel = q.numel()
    out_bytes = 2 * 2 * numel * size  # q and k, read + write
    in_place_bytes = out_bytes * args.rotary_dim // args.head_dim

    rows = []
    with torch.no_grad():
        ms = time_ms(lambda: apply_rotary_qk(q, k, cos, sin, impl="cuda"), args.iters, args.warmup)
        rows.append(("rotary fwd", "megaphi cuda", ms, out_bytes, None))
        ms = time_ms(lambda: apply_rotary_qk(q, k, cos, sin, impl="cuda", inplace=True), args.iters, args.warmup)
        rows.append(("rotary fwd in place", "megaphi cuda", ms, in_place_bytes, None))
        ms = time_ms(lambda: apply_rotary_qk(q, k, cos, sin, impl="torch"), args.iters, args.warmup)
        rows.append(("rotary fwd", "torch eager", ms, out_bytes, None))
        compiled, why = maybe_compile(lambda a, c: apply_rotary_qk(a, c, cos, sin, impl="torch"), args)
        if compiled is None:
            rows.append(("rotary fwd", "torch.compile", None, None, why))
        else:
            ms = time_ms(lambda: compiled(q, k), args.iters, args.warmup)
            rows.append(("rotary fwd", "torch.compile", ms, out_bytes, None))
    qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    for name, impl in (("megaphi cuda", "cuda"), ("torch eager", "torch")):

        def fwd_bwd():
            qg.grad = kg.grad = None
            q_rot, k_rot = apply_rotary_qk(qg, kg, cos, sin, impl=impl)
            torch.autograd.backward((q_rot, k_rot), (q, k))

        rows.append(("rotary fwd+bwd", name, time_ms(fwd_bwd, args.iters, args.warmup), 2 * out_bytes, None))
    return rows


def print_table(rows, copy_gbs):
    print(f"{'op':<22}{'implementation':<22}{'time (us)':>12}{'GB/s':>10}{'% copy':>9}")
    for op, name, ms, nbytes, note in rows:
        if ms is None:
            print(f"{op:<22}{name:<22}{'-':>12}{'-':>10}{'-':>9}   ({note})")
            continue
        gbs = nbytes / ms / 1e6
        print(f"{op:<22}{name:<22}{ms * 1e3:>12.1f}{gbs:>10.0f}{100 * gbs / copy_gbs:>8.0f}%")


def write_json(path, rows, copy_gbs, **info):
    import json

    records = []
    for op, name, ms, nbytes, note in rows:
        gbs = None if ms is None else nbytes / ms / 1e6
        records.append(
            {
                "op": op,
                "implementation": name,
                "us": None if ms is None else ms * 1e3,
                "gb_per_s": gbs,
                "percent_of_copy": None if gbs is None else 100 * gbs / copy_gbs,
                "note": note,
            }
        )
    with open(path, "w") as f:
        json.dump(
            {"device": torch.cuda.get_device_name(), "copy_gb_per_s": copy_gbs, **info, "rows": records}, f, indent=1
        )


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(f"benchmarks/kernels.py needs a CUDA GPU; torch {torch.__version__} sees none. Nothing to measure.")
        return 0
    from megaphi.ops import backend

    reason = backend.cuda_unavailable_reason()
    if reason is not None:
        print(f"benchmarks/kernels.py: megaphi's CUDA kernels are unusable: {reason}", file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    copy_gbs = copy_bandwidth(args.iters, args.warmup)
    print(
        f"{torch.cuda.get_device_name()}, {args.dtype}; LayerNorm {args.tokens} x {args.hidden}; rotary "
        f"[{max(1, args.tokens // args.seq)}, {args.seq}, {args.heads}, {args.head_dim}] rotary_dim {args.rotary_dim}"
    )
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)\n")
    rows = layer_norm_rows(args, dtype) + rotary_rows(args, dtype)
    print_table(rows, copy_gbs)
    if args.json:
        write_json(args.json, rows, copy_gbs, dtype=args.dtype)
    eager = {op: ms for op, name, ms, _, _ in rows if name == "torch eager"}
    ours = {op: ms for op, name, ms, _, _ in rows if name == "megaphi cuda"}
    if "LN fwd+bwd" in eager and "LN fwd+bwd" in ours:
        print(f"\nLN fwd+bwd speed-up over torch eager: {eager['LN fwd+bwd'] / ours['LN fwd+bwd']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the GPTDataset index build (document, sample, shuffle index) and the blending indices.

The document lengths are synthetic and live in memory (no token file is needed: the index build
only reads sequence lengths). Default: 1M samples of 2048 tokens; `--full` is the issue's target,
25M samples of 2048 tokens (about 51B tokens, ~50M documents), to be built in under 30 s.

    python benchmarks/indices.py            # small, about a minute on 2 cores
    python benchmarks/indices.py --full     # 25M x 2048
"""

import argparse
import resource
import sys
import time

import numpy as np

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))

from megaphi import _C  # noqa: E402
from megaphi.data.gpt_dataset import build_gpt_indices  # noqa: E402


def synthetic_lengths(num_tokens: int, mean_length: float, seed: int) -> np.ndarray:
    """Lognormal document lengths (code files: many short, a long tail) summing to >= num_tokens."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean_length) - sigma**2 / 2
    count = int(num_tokens / mean_length * 1.02) + 16
    lengths = np.clip(rng.lognormal(mu, sigma, size=count), 1, 1 << 20).astype(np.int32)
    cumulative = np.cumsum(lengths, dtype=np.int64)
    keep = int(np.searchsorted(cumulative, num_tokens)) + 1
    if keep > len(lengths):
        raise RuntimeError("synthetic corpus too small; raise the margin")
    return lengths[:keep]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1_000_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--mean-doc-length", type=float, default=1000.0, help="tokens per document")
    parser.add_argument(
        "--epochs",
        type=float,
        default=1.0,
        help="corpus size as a fraction of the tokens needed: 1.0 = one epoch, 0.4 = 3 epochs",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--full", action="store_true", help="25M samples of 2048 tokens (the 30 s target)")
    args = parser.parse_args()
    if args.full:
        args.num_samples, args.seq_length = 25_000_000, 2048

    needed = args.num_samples * args.seq_length + 1
    t = time.perf_counter()
    lengths = synthetic_lengths(int(needed * args.epochs), args.mean_doc_length, args.seed)
    setup = time.perf_counter() - t
    print(
        f"corpus: {len(lengths):,} documents, {int(lengths.sum(dtype=np.int64)):,} tokens "
        f"(synthetic, generated in {setup:.1f} s, not timed below)"
    )

    timings = {}
    t = time.perf_counter()
    indices = build_gpt_indices(lengths, 0, len(lengths), args.seq_length, args.num_samples, args.seed, timings)
    total = time.perf_counter() - t

    t = time.perf_counter()
    _C.build_blending_indices(np.array([0.7, 0.3]), args.num_samples)
    blend = time.perf_counter() - t

    rows = [
        ("document_index (tile + RandomState.shuffle)", timings["document_index"], indices["document_index"]),
        ("sample_index (C++ build_sample_index)", timings["sample_index"], indices["sample_index"]),
        ("shuffle_index (RandomState.shuffle)", timings["shuffle_index"], indices["shuffle_index"]),
        ("total GPTDataset indices", total, None),
        ("blending indices, 2 datasets (C++)", blend, None),
    ]
    print(
        f"\n{args.num_samples:,} samples x {args.seq_length} tokens, epochs={timings['num_epochs']}, "
        f"separate final epoch={timings['separate_final_epoch']}"
    )
    print(f"{'step':<46} {'seconds':>8} {'rows':>14} {'dtype':>7} {'MB':>8}")
    for name, seconds, array in rows:
        if array is None:
            print(f"{name:<46} {seconds:>8.2f}")
        else:
            print(f"{name:<46} {seconds:>8.2f} {array.shape[0]:>14,} {array.dtype.name:>7} {array.nbytes / 1e6:>8.0f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"peak RSS {peak:,.0f} MB; target: total < 30 s at 25M x 2048 -> {'met' if total < 30 else 'NOT met'}"
        if args.num_samples >= 25_000_000
        else f"peak RSS {peak:,.0f} MB"
    )


if __name__ == "__main__":
    main()

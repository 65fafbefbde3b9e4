"""Does tests/ops/test_kernels_hipcpu.py catch broken kernels? Plants one known bug at a time in a copy of
csrc/kernels, builds it for each CPU runtime (the fiber runtime, and HIP-CPU where complete) and runs
the test file against it on that runtime alone. A mutation is caught when the tests fail, crash or
hang; "not caught" means they passed with the bug in place.

    python tests/hipcpu/mutations.py              # all mutations, ~1 minute each per runtime on 2 cores
    python tests/hipcpu/mutations.py --only NAME  # some of them
    MEGAPHI_CPU_RUNTIME=fiber python tests/hipcpu/mutations.py   # one runtime

Prints a markdown table, one column per runtime; docs/kernels.md keeps the latest. The repository's
sources are never changed.
"""

import argparse
import dataclasses
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from hipcpu import build  # noqa: E402

TEST_FILE = build.REPO_ROOT / "tests" / "test_kernels_hipcpu.py"


@dataclasses.dataclass
class Mutation:
    name: str
    file: str
    old: str  # must occur exactly once in the file
    new: str
    bug: str


MUTATIONS = [
    Mutation(
        "warp_sum_half_warp",
        "common.cuh",
        "for (int offset = 16; offset > 0;",
        "for (int offset = 8; offset > 0;",
        "warp_sum starts at shuffle offset 8: each lane sums only its half-warp",
    ),
    Mutation(
        "warp_sum_skips_a_level",
        "common.cuh",
        "offset > 0; offset >>= 1)",
        "offset > 0; offset >>= 2)",
        "warp_sum shuffles at offsets 16, 4, 1 (skips 8 and 2)",
    ),
    Mutation(
        "block_sum_no_barrier_before_read",
        "common.cuh",
        "        scratch[32 + warp] = b;\n    }\n    __syncthreads();",
        "        scratch[32 + warp] = b;\n    }",
        "block_sum2 reads the warp partials without the __syncthreads() after writing them",
    ),
    Mutation(
        "block_sum_no_barrier_before_reuse",
        "common.cuh",
        "    __syncthreads();\n    return total;",
        "    return total;",
        "block_sum2 returns without the __syncthreads() that protects scratch from the next call",
    ),
    Mutation(
        "block_sum_drops_last_warp",
        "common.cuh",
        "for (int w = 0; w < num_warps; ++w)",
        "for (int w = 0; w < num_warps - 1; ++w)",
        "block_sum2 adds all warp partials but the last",
    ),
    Mutation(
        "ln_fwd_block_row_loop_overruns",
        "layer_norm.cu",
        "for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {\n        const T* xr = x + row * hidden;",
        "for (int64_t row = blockIdx.x; row <= rows; row += gridDim.x) {\n        const T* xr = x + row * hidden;",
        "LayerNorm forward (block) grid-stride loop runs to row <= rows: one row past the end",
    ),
    Mutation(
        "ln_fwd_warp_stride_skips_rows",
        "layer_norm.cu",
        "row += warps_total)",
        "row += warps_total + 1)",
        "LayerNorm forward (warp) grid-stride step one warp too far: rows skipped",
    ),
    Mutation(
        "ln_fwd_no_eps",
        "layer_norm.cu",
        "rsqrtf(block_sum2(sq, 0.f, scratch).x * inv_hidden + eps)",
        "rsqrtf(block_sum2(sq, 0.f, scratch).x * inv_hidden)",
        "LayerNorm forward (block) forgets eps",
    ),
    Mutation(
        "ln_fwd_one_pass_variance",
        "layer_norm.cu",
        "const float d = v[i] - mean;\n                sq += d * d;\n            }\n        }\n"
        "        const float rstd = rsqrtf(block_sum2(sq, 0.f, scratch).x * inv_hidden + eps);",
        "const float d = v[i];\n                sq += d * d;\n            }\n        }\n"
        "        const float rstd = rsqrtf(block_sum2(sq, 0.f, scratch).x * inv_hidden - mean * mean + eps);",
        "LayerNorm forward (block) takes the variance as E[x^2] - mean^2 (cancels when mean >> std)",
    ),
    Mutation(
        "ln_fwd_unaligned_x_vectorised",
        "layer_norm.cu",
        "hidden % VEC == 0 && aligned16(x) && aligned16(weight)",
        "hidden % VEC == 0 && aligned16(weight)",
        "LayerNorm forward takes 16-byte packs without checking that x is aligned",
    ),
    Mutation(
        "ln_bwd_stride_skips_rows",
        "layer_norm.cu",
        "row += gridDim.x) {\n        const float mu = mean[row];\n        const float rs = rstd[row];\n"
        "        const T* xr",
        "row += gridDim.x + 1) {\n        const float mu = mean[row];\n        const float rs = rstd[row];\n"
        "        const T* xr",
        "LayerNorm backward (block) grid-stride step one block too far",
    ),
    Mutation(
        "ln_bwd_partials_not_zeroed",
        "layer_norm.cu",
        "for (int i = 0; i < VEC; ++i) acc_w[p * VEC + i] = acc_b[p * VEC + i] = 0.f;",
        "for (int i = 0; i < VEC; ++i) (void)0;",
        "LayerNorm backward (block) never zeroes its dweight/dbias partials",
    ),
    Mutation(
        "ln_bwd_dbias_row_overlaps",
        "layer_norm.cu",
        "float* part_b_out = workspace + (static_cast<int64_t>(gridDim.x) + blockIdx.x) * hidden;",
        "float* part_b_out = workspace + (static_cast<int64_t>(gridDim.x) - 1 + blockIdx.x) * hidden;",
        "LayerNorm backward (block) writes dbias partials one workspace row early (over dweight's)",
    ),
    Mutation(
        "ln_bwd_reduce_drops_last_block",
        "layer_norm.cu",
        "r < num_blocks; r += 8)",
        "r < num_blocks - 1; r += 8)",
        "dweight/dbias reduction skips the last block's partials",
    ),
    Mutation(
        "ln_bwd_reduce_no_barrier",
        "layer_norm.cu",
        "    sums_b[threadIdx.y][threadIdx.x] = acc_b;\n    __syncthreads();",
        "    sums_b[threadIdx.y][threadIdx.x] = acc_b;",
        "dweight/dbias reduction reads the other lanes' sums without __syncthreads()",
    ),
    Mutation(
        "ln_bwd_fast_int32_offsets",
        "layer_norm.cu",
        "const int64_t offset = row * HIDDEN + (p * kBwdFastThreads + threadIdx.x) * VEC;",
        "const int offset = static_cast<int>(row) * HIDDEN + (p * kBwdFastThreads + threadIdx.x) * VEC;",
        "LayerNorm backward (fast) indexes in int32: wraps past 2^31 elements",
    ),
    Mutation(
        "ln_bwd_shared_partials_over_48k",
        "layer_norm.cu",
        "+ kBlockSumScratchFloats * sizeof(float) <= 48 * 1024;",
        "+ kBlockSumScratchFloats * sizeof(float) <= 96 * 1024;",
        "LayerNorm backward keeps partials in shared memory up to 96 KiB (GPUs need an opt-in above 48 KiB)",
    ),
    Mutation(
        "ln_bwd_block_static_shared_grows",
        "layer_norm.cu",
        "MEGAPHI_DYNAMIC_SHARED(float, shared_partials);\n    __shared__ float scratch[kBlockSumScratchFloats];",
        "MEGAPHI_DYNAMIC_SHARED(float, shared_partials);\n    __shared__ float scratch[kBlockSumScratchFloats + 1];",
        "LayerNorm backward (block) gets 4 more bytes of static shared memory than the host counts: "
        "over 48 KiB at hidden 6112",
    ),
    Mutation(
        "ln_fwd_warp_no_eps",
        "layer_norm.cu",
        "rsqrtf(warp_sum(sq) * inv_hidden + eps)",
        "rsqrtf(warp_sum(sq) * inv_hidden)",
        "LayerNorm forward (warp, hidden 1024/2048) forgets eps",
    ),
    Mutation(
        "ln_fwd_warp_eps_outside_rsqrt",
        "layer_norm.cu",
        "rsqrtf(warp_sum(sq) * inv_hidden + eps)",
        "rsqrtf(warp_sum(sq) * inv_hidden) + eps",
        "LayerNorm forward (warp) computes rsqrt(var) + eps",
    ),
    Mutation(
        "ln_bwd_reduce_last_row_reads_early",
        "layer_norm.cu",
        "    sums_b[threadIdx.y][threadIdx.x] = acc_b;\n    __syncthreads();\n    if (threadIdx.y == 0 && col",
        "    sums_b[threadIdx.y][threadIdx.x] = acc_b;\n    if (threadIdx.y == 7 && col",
        "dweight/dbias reduction: the highest-index lanes read the others' sums without __syncthreads()",
    ),
    Mutation(
        "rotary_skips_pass_through_copy",
        "rotary.cu",
        "const int copy_items = in_place ? 0 : static_cast<int>((head_dim - 2 * half) / vec);",
        "const int copy_items = 0;",
        "rotary out of place does not copy the dims past rotary_dim",
    ),
    Mutation(
        "rotary_token_stride_skips",
        "rotary.cu",
        "token < tokens; token += gridDim.x)",
        "token < tokens; token += gridDim.x + 1)",
        "rotary grid-stride step one block too far: tokens skipped",
    ),
    Mutation(
        "rotary_wrong_sin_sign",
        "rotary.cu",
        "o2[i] = x2[i] * c + x1[i] * sn;",
        "o2[i] = x2[i] * c - x1[i] * sn;",
        "rotary second half rotated with the wrong sign of sin",
    ),
    Mutation(
        "rotary_k_out_uses_q_layout",
        "rotary.cu",
        "k_out + offset_of(layouts.k_out,",
        "k_out + offset_of(layouts.q_out,",
        "rotary writes k with q's output strides",
    ),
    Mutation(
        "rotary_ignores_batch_of_ids",
        "rotary.cu",
        "position_ids[b * pos_batch_stride + s]",
        "position_ids[s]",
        "rotary reads batch 0's position_ids for every batch",
    ),
    Mutation(
        "rotary_vectorises_odd_half",
        "rotary.cu",
        "const bool vectorized = half % VEC_WIDE == 0 && ",
        "const bool vectorized = ",
        "rotary takes 16-byte packs when rotary_dim/2 is not a multiple of them",
    ),
    Mutation(
        "rotary_vectorises_padded_head",
        "rotary.cu",
        "half % VEC_WIDE == 0 && head_dim % VEC_WIDE == 0 && aligned16(q_in)",
        "half % VEC_WIDE == 0 && aligned16(q_in)",
        "rotary takes 16-byte packs without checking head_dim % pack (padded rows: the tail is never copied)",
    ),
]


def run_mutation(mutation, runtime_name, timeout):
    """('caught' | 'not caught' | 'invalid', detail) on one runtime."""
    with tempfile.TemporaryDirectory(prefix=f"megaphi-mutation-{mutation.name}-") as tmp:
        sources = pathlib.Path(tmp) / "kernels"
        shutil.copytree(build.REPO_ROOT / "csrc" / "kernels", sources)
        target = sources / mutation.file
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return "invalid", f"pattern found {text.count(mutation.old)} times in {mutation.file}"
        target.write_text(text.replace(mutation.old, mutation.new))
        env = dict(
            os.environ, MEGAPHI_KERNEL_SOURCES=str(sources), MEGAPHI_CPU_RUNTIME=runtime_name, COLUMNS="400"
        )  # untruncated summary lines
        os.environ["MEGAPHI_KERNEL_SOURCES"] = str(sources)
        try:
            build.build(runtime_name=runtime_name)
        except RuntimeError as error:
            return "invalid", "does not compile: " + str(error).splitlines()[-1][:200]
        finally:
            del os.environ["MEGAPHI_KERNEL_SOURCES"]
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", str(TEST_FILE)]
        try:
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=build.REPO_ROOT)
        except subprocess.TimeoutExpired:
            return "caught", f"hang (no result in {timeout} s)"
    if result.returncode == 0:
        passed = re.search(r"(\d+) passed", result.stdout)
        return "not caught", f"{passed.group(1) if passed else 'all'} tests passed"
    if result.returncode < 0:
        return "caught", f"crash ({signal.Signals(-result.returncode).name})"
    failed = re.search(r"^(?:FAILED|ERROR) \S+::(\S+)(?: - (.*))?$", result.stdout, re.M)
    if failed is None:
        return "caught", f"pytest exit code {result.returncode}: {result.stdout.strip().splitlines()[-1:]}"
    message = (failed.group(2) or "").split("\n")[0]
    return "caught", f"{failed.group(1)}: {message[:140]}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds before a test run counts as hung")
    args = parser.parse_args()
    runtimes = build.runtimes()
    for runtime_name in runtimes:
        reason = build.missing_prerequisite(runtime_name)
        if reason is not None:
            sys.exit(reason)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    rows = []
    for mutation in chosen:
        cells = [f"`{mutation.name}`", mutation.bug]
        for runtime_name in runtimes:
            verdict, detail = run_mutation(mutation, runtime_name, args.timeout)
            print(f"{mutation.name} on {runtime_name}: {verdict} ({detail})", file=sys.stderr, flush=True)
            cells.append(f"{verdict}: {detail}")
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    print("| mutation | planted bug | " + " | ".join(runtimes) + " |\n|---|---|" + "---|" * len(runtimes))
    print("\n".join(rows))


if __name__ == "__main__":
    main()

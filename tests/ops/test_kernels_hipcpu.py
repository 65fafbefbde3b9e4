"""megaphi's CUDA kernels (csrc/kernels) executed on the CPU, against float64 references.

The .cu sources are compiled unchanged with g++ (tests/hipcpu/build.py, cached) and called through
ctypes over CPU tensors, so every kernel runs in CI without a GPU, on two runtimes: megaphi's fiber
runtime (tests/hipcpu/fiber_runtime), which runs threads between barriers in forward, reverse or
seeded random order with warps running ahead, interleaves blocks, gives every block fresh garbage
in its shared memory and refuses launches over 48 KiB of shared memory per block; and HIP-CPU where a
complete checkout is at hand (one fixed order). Each test runs under one schedule picked from its
name; the schedule tests run every path under all three and require bitwise equal results. Register
limits, __launch_bounds__ and speed are left to the GPU tests (tests/ops/test_kernels_cuda.py).
The build caps grids at MAX_GRID_BLOCKS = 13 blocks instead of 2^20, so 130 rows or a few dozen
tokens already make blocks stride over rows/tokens, in every kernel that strides (the backward's
block count is the caller's choice: 1 to 13 here, more blocks than rows included).

References: float64 torch (autograd LayerNorm, an explicit rotation) from the same rounded inputs.
Tolerances, |got - want| <= u_out * |want| + fp32_error (+ 2^-25 for fp16: half its subnormal step):
  u_out      one rounding to the output dtype, half an ulp: fp32 2^-24, fp16 2^-11, bf16 2^-8
  fp32_error the kernels' fp32 arithmetic before that rounding, worst case: 2^-24 x the number of
             roundings a result goes through x the magnitude of the terms involved. A row sum goes
             through at most depth = hidden/32 + 32 additions (a thread's share of the row, the warp
             tree, the warp partials); 4 x depth covers mean and rstd feeding xhat. dweight/dbias add
             the row sums: rows/num_blocks per block, then num_blocks/8 + 8 in the reduce kernel.
             Rotary: 4 roundings of |x1 cos| + |x2 sin|.
Outputs start as NaN (a missed element fails), buffers sit between guard bytes (a stray write fails),
inputs must come back unchanged, and pass-through data must be bitwise identical.
"""

import math
import zlib

import pytest
import torch

from hipcpu import build
from hipcpu.buffers import Guarded, same_bits
from hipcpu.kernels import SCHEDULES, CpuKernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FP32_U = 2.0**-24
EPS = 1e-5
STRIDING_ROWS = 10 * build.MAX_GRID_BLOCKS  # more rows than any grid has blocks (warp forward: 4 rows a block)


@pytest.fixture(scope="module", params=build.runtimes())
def kernels(request):
    reason = build.missing_prerequisite(request.param)
    if reason is not None:
        pytest.skip(reason)
    return CpuKernels(build.build(runtime_name=request.param))


@pytest.fixture(autouse=True)
def fiber_schedule(request):
    """On the fiber runtime, each test runs under the schedule and seed its name hashes to, so the cases
    of one test spread over all schedules and a failure reproduces by name. Returns the schedule."""
    if "kernels" not in request.fixturenames:
        return None
    kernels = request.getfixturevalue("kernels")
    if not kernels.has_schedules:
        return None
    name_hash = zlib.crc32(request.node.nodeid.encode())
    order = SCHEDULES[name_hash % len(SCHEDULES)]
    kernels.set_schedule(order, seed=name_hash)
    return order


def needs_schedules(kernels):
    if not kernels.has_schedules:
        pytest.skip("HIP-CPU runs threads in one fixed order: schedules are the fiber runtime's")


def tiny(dtype):
    return 2.0**-25 if dtype == torch.float16 else 0.0


def assert_within(got, want, bound, what):
    got = got.double()
    assert not torch.isnan(got).any(), f"{what}: NaN in the output (an element was never written)"
    excess = (got - want).abs() - bound
    if (excess > 0).any():
        i = int(torch.argmax(excess.flatten()))
        pytest.fail(
            f"{what}: {int((excess > 0).sum())} of {got.numel()} elements out of tolerance; worst at flat "
            f"index {i}: got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}, "
            f"bound {bound.flatten()[i].item():.3g}"
        )


# ---------------------------------------------------------------------------------------------- LayerNorm


def layer_norm_inputs(rows, hidden, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) * 2 + 0.3).to(dtype)  # not centred, never all equal
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    bias = torch.randn(hidden, generator=gen).to(dtype)
    dy = torch.randn(rows, hidden, generator=gen).to(dtype)
    return x, weight, bias, dy


def run_layer_norm(kernels, x, weight, bias, dy, num_blocks, misalign=None):
    """Both kernels on guarded copies; returns the outputs after checking guards and inputs."""
    misalign = misalign or {}
    rows, hidden = x.shape
    inputs = {
        name: Guarded(t.shape, t.dtype, like=t, misalign=misalign.get(name, 0))
        for name, t in (("x", x), ("weight", weight), ("bias", bias), ("dy", dy))
    }
    outputs = {
        "y": Guarded(x.shape, x.dtype, misalign=misalign.get("y", 0)),
        "mean": Guarded((rows,), torch.float32),
        "rstd": Guarded((rows,), torch.float32),
    }
    t = {name: g.tensor for name, g in {**inputs, **outputs}.items()}
    kernels.layer_norm_forward(t["x"], t["weight"], t["bias"], t["y"], t["mean"], t["rstd"], EPS)
    outputs.update(
        dx=Guarded(x.shape, x.dtype, misalign=misalign.get("dx", 0)),
        dweight=Guarded(weight.shape, x.dtype),
        dbias=Guarded(weight.shape, x.dtype),
        workspace=Guarded((2, num_blocks, hidden), torch.float32),
    )
    t.update({name: outputs[name].tensor for name in ("dx", "dweight", "dbias", "workspace")})
    kernels.layer_norm_backward(
        t["dy"], t["x"], t["weight"], t["mean"], t["rstd"], t["dx"], t["dweight"], t["dbias"], t["workspace"]
    )
    for name, g in {**inputs, **outputs}.items():
        assert g.guards_intact(), f"a kernel wrote outside {name}"
    for name, original in (("x", x), ("weight", weight), ("bias", bias), ("dy", dy)):
        assert same_bits(inputs[name].tensor, original), f"a kernel changed its input {name}"
    return {name: g.tensor for name, g in outputs.items() if name != "workspace"}


def check_layer_norm(got, x, weight, bias, dy, num_blocks, what):
    rows, hidden = x.shape
    x64 = x.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    b64 = bias.double().requires_grad_(True)
    y64 = torch.nn.functional.layer_norm(x64, (hidden,), w64, b64, EPS)
    xd, wd, bd = x64.detach(), w64.detach(), b64.detach()
    mean = xd.mean(-1, keepdim=True)
    rstd = 1.0 / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + EPS)
    u, small = UNIT_ROUNDOFF[x.dtype], tiny(x.dtype)
    row_error = 4 * (hidden / 32 + 32) * FP32_U
    mean_abs_x = xd.abs().mean(-1, keepdim=True)
    cond = 1 + mean_abs_x * rstd  # how much the mean's rounding error is amplified by the normalisation
    xhat_mag = ((xd - mean).abs() * rstd + 1) * cond

    assert_within(got["mean"], mean[:, 0], row_error * mean_abs_x[:, 0], f"{what} mean")
    assert_within(got["rstd"], rstd[:, 0], row_error * (rstd * cond)[:, 0], f"{what} rstd")
    y = y64.detach()
    assert_within(got["y"], y, u * y.abs() + row_error * (xhat_mag * wd.abs() + bd.abs()) + small, f"{what} y")
    dyd = dy.double()
    dx64, dw64, db64 = torch.autograd.grad(y64, (x64, w64, b64), dyd)
    wdy = (wd * dyd).abs()
    dx_mag = rstd * cond * (wdy + wdy.mean(-1, keepdim=True) + xhat_mag * (wdy * xhat_mag).mean(-1, keepdim=True))
    assert_within(got["dx"], dx64, u * dx64.abs() + row_error * dx_mag + small, f"{what} dx")
    sum_error = (math.ceil(rows / num_blocks) + math.ceil(num_blocks / 8) + 8) * FP32_U
    dw_mag = (dyd.abs() * xhat_mag).sum(0)
    assert_within(got["dweight"], dw64, u * dw64.abs() + (row_error + sum_error) * dw_mag + small, f"{what} dweight")
    assert_within(got["dbias"], db64, u * db64.abs() + sum_error * dyd.abs().sum(0) + small, f"{what} dbias")


@pytest.mark.parametrize("rows", [1, 3, STRIDING_ROWS])
@pytest.mark.parametrize("hidden", [1, 7, 1000, 1024, 2048, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_vs_float64(kernels, dtype, hidden, rows):
    """Every forward/backward path: warp (1024; 2048 in 16-bit) and block forward, fast (1024, 2048)
    and block backward with partials in shared memory (<= 6112) or in the workspace (8192)."""
    x, weight, bias, dy = layer_norm_inputs(rows, hidden, dtype, seed=hidden + rows)
    num_blocks = min(rows, 8)
    got = run_layer_norm(kernels, x, weight, bias, dy, num_blocks)
    check_layer_norm(got, x, weight, bias, dy, num_blocks, f"{dtype} {rows}x{hidden}")


@pytest.mark.parametrize("num_blocks", [1, 2, build.MAX_GRID_BLOCKS])
@pytest.mark.parametrize("hidden", [7, 1024, 2048, 8192])
def test_layer_norm_backward_block_counts(kernels, hidden, num_blocks):
    """One block for every row, and more blocks than rows (blocks without rows write zero partials)."""
    x, weight, bias, dy = layer_norm_inputs(10, hidden, torch.bfloat16, seed=11)
    got = run_layer_norm(kernels, x, weight, bias, dy, num_blocks)
    check_layer_norm(got, x, weight, bias, dy, num_blocks, f"num_blocks={num_blocks} 10x{hidden}")


@pytest.mark.parametrize("pointer", ["x", "weight", "bias", "y", "dy", "dx"])
@pytest.mark.parametrize("hidden", [1024, 2048, 1000, 8192])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_layer_norm_unaligned_pointer_takes_the_scalar_path(kernels, dtype, hidden, pointer):
    x, weight, bias, dy = layer_norm_inputs(37, hidden, dtype, seed=3)
    got = run_layer_norm(kernels, x, weight, bias, dy, 4, misalign={pointer: 1})
    check_layer_norm(got, x, weight, bias, dy, 4, f"unaligned {pointer}")


@pytest.mark.parametrize(
    "dtype, hidden", [(torch.float32, 1000), (torch.float32, 1024), (torch.float16, 2048)], ids=str
)
def test_layer_norm_rows_far_from_zero(kernels, dtype, hidden):
    """Rows of 300 + N(0, 1): the variance must come from x - mean (E[x^2] - mean^2 cancels in fp32)."""
    x, weight, bias, dy = layer_norm_inputs(20, hidden, dtype, seed=13)
    x = (x.float() / 2 + 300).to(dtype)
    got = run_layer_norm(kernels, x, weight, bias, dy, 4)
    check_layer_norm(got, x, weight, bias, dy, 4, f"300 + N(0, 1) {dtype} 20x{hidden}")


@pytest.mark.parametrize("hidden", [1000, 2048, 8192])
def test_layer_norm_is_deterministic(kernels, hidden):
    """Bitwise equal outputs run to run, dweight/dbias included (no atomics; blocks run on several threads)."""
    x, weight, bias, dy = layer_norm_inputs(300, hidden, torch.float32, seed=5)
    first = run_layer_norm(kernels, x, weight, bias, dy, 7)
    for _ in range(2):
        again = run_layer_norm(kernels, x, weight, bias, dy, 7)
        for name in first:
            assert same_bits(first[name], again[name]), f"{name} differs between identical runs"


LN_PATHS = [  # dtype, hidden, misaligned pointer: every forward and backward path
    (torch.float32, 1024, None),  # warp forward, fast backward
    (torch.bfloat16, 1024, None),  # warp forward, fast backward, 16-bit
    (torch.float16, 2048, None),  # warp forward 2048 (16-bit only), fast backward 2048
    (torch.float32, 2048, None),  # block forward (fp32 2048), fast backward
    (torch.bfloat16, 1000, None),  # block forward, block backward with partials in shared memory
    (torch.float32, 7, None),  # scalar block forward and backward
    (torch.float32, 6112, None),  # partials + scratch fill exactly the 48 KiB of shared memory
    (torch.bfloat16, 8192, None),  # partials in the workspace
    (torch.float16, 1024, "x"),  # unaligned: scalar block paths at a warp-path size
]


def ln_path_id(path):
    dtype, hidden, misaligned = path
    return f"{str(dtype)[6:]}-{hidden}" + (f"-unaligned_{misaligned}" if misaligned else "")


@pytest.mark.parametrize("dtype, hidden, misaligned", LN_PATHS, ids=[ln_path_id(p) for p in LN_PATHS])
def test_layer_norm_low_variance_rows(kernels, dtype, hidden, misaligned):
    """Rows of std 1e-3 (variance 1e-6 < eps = 1e-5): eps decides rstd, so a kernel that drops eps or adds
    it outside the square root is off by a factor of about 3; at std ~2 eps is invisible."""
    x, weight, bias, dy = layer_norm_inputs(30, hidden, dtype, seed=hidden + 17)
    x = ((x.float() - 0.3) / 2 * 1e-3 + 3e-4).to(dtype)  # N(3e-4, 1e-3^2)
    misalign = {misaligned: 1} if misaligned else None
    got = run_layer_norm(kernels, x, weight, bias, dy, 4, misalign=misalign)
    check_layer_norm(got, x, weight, bias, dy, 4, f"std 1e-3 {ln_path_id((dtype, hidden, misaligned))}")


@pytest.mark.parametrize("dtype, hidden, misaligned", LN_PATHS, ids=[ln_path_id(p) for p in LN_PATHS])
def test_layer_norm_same_bits_under_every_schedule(kernels, dtype, hidden, misaligned):
    """Each path under the forward, reverse and random schedules (warps running ahead, blocks interleaved,
    garbage in shared memory): right every time, and bitwise the same, since a kernel without races
    computes the same sums in the same order whatever the order of its threads. Rows enough that every
    grid strides."""
    needs_schedules(kernels)
    x, weight, bias, dy = layer_norm_inputs(STRIDING_ROWS // 2, hidden, dtype, seed=hidden + 23)
    misalign = {misaligned: 1} if misaligned else None
    results = {}
    for order in SCHEDULES:
        kernels.set_schedule(order, seed=hidden)
        got = run_layer_norm(kernels, x, weight, bias, dy, 5, misalign=misalign)
        check_layer_norm(got, x, weight, bias, dy, 5, f"{order} schedule {ln_path_id((dtype, hidden, misaligned))}")
        results[order] = got
    for order in SCHEDULES[1:]:
        for name, tensor in results[order].items():
            assert same_bits(tensor, results[SCHEDULES[0]][name]), f"{name}: schedules {order} and forward differ"


def test_layer_norm_errors_come_back_as_exceptions(kernels):
    x, weight, bias, _ = layer_norm_inputs(2, 8, torch.float32, seed=6)
    y, mean, rstd = torch.empty_like(x), torch.empty(2), torch.empty(2)
    with pytest.raises(RuntimeError, match="num_blocks"):
        kernels.layer_norm_backward(x, x, weight, mean, rstd, y, weight.clone(), bias.clone(), torch.empty(2, 0, 8))


# ------------------------------------------------------------------------------------------------- rotary


def rotary_tables(rotary_dim, max_positions):
    """fp32 cos/sin [max_positions, rotary_dim / 2], as the model builds them (values only matter as data)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def reference_rotary(x, cos, sin, positions, inverse):
    """float64 rotate-half of x [b, s, h, d] at positions [b or 1, s]; returns (want, fp32 error bound)."""
    half = cos.shape[1]
    c = cos.double()[positions][:, :, None, :]
    s = sin.double()[positions][:, :, None, :] * (-1.0 if inverse else 1.0)
    x64 = x.double()
    x1, x2, rest = x64[..., :half], x64[..., half : 2 * half], x64[..., 2 * half :]
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)
    first, second = (x1 * c).abs() + (x2 * s).abs(), (x2 * c).abs() + (x1 * s).abs()
    magnitude = torch.cat([first, second, torch.zeros_like(rest)], dim=-1)
    return want, 4 * FP32_U * magnitude


def check_rotary(got, x, cos, sin, positions, inverse, what):
    rot = 2 * cos.shape[1]
    want, fp32_error = reference_rotary(x, cos, sin, positions, inverse)
    assert_within(got, want, UNIT_ROUNDOFF[x.dtype] * want.abs() + fp32_error + tiny(x.dtype), what)
    assert same_bits(got[..., rot:], x[..., rot:]), f"{what}: pass-through dims are not an exact copy"


def positions_for(kind, batch, seq, max_positions, gen):
    """(position_ids or None, offset, positions [b or 1, s] for the reference)."""
    if kind == "ids":
        ids = torch.randint(0, max_positions, (batch, seq), generator=gen)
        return ids, 0, ids
    if kind == "ids_shared":
        ids = torch.randint(0, max_positions, (1, seq), generator=gen)
        return ids, 0, ids
    offset = 1000 if kind == "offset" else 0
    return None, offset, (offset + torch.arange(seq))[None]


def random_qk(shape, dtype, gen):
    batch, seq, q_heads, k_heads, head_dim, _ = shape
    q = (torch.randn(batch, seq, q_heads, head_dim, generator=gen) + 0.1).to(dtype)
    k = (torch.randn(batch, seq, k_heads, head_dim, generator=gen) - 0.1).to(dtype)
    return q, k


ROPE_SHAPES = [  # batch, seq, q_heads, k_heads, head_dim, rotary_dim
    (2, 64, 32, 32, 64, 32),  # phi-1 attention: 16-byte packs, pass-through half of each head
    (1, 17, 3, 3, 16, 16),  # full rotary
    (3, 7, 3, 2, 10, 6),  # odd sizes: scalar path, different head counts
    (3, 5, 2, 5, 64, 8),  # more k heads than q heads
    (1, 1, 1, 1, 2, 2),  # one token
]


@pytest.mark.parametrize("positions", ["none", "offset", "ids", "ids_shared"])
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_vs_float64(kernels, dtype, shape, positions):
    """q and k in one launch, forward and inverse, out of place (NaN-filled outputs) and in place."""
    gen = torch.Generator().manual_seed(7)
    q, k = random_qk(shape, dtype, gen)
    cos, sin = rotary_tables(shape[5], 4096)
    ids, offset, table_rows = positions_for(positions, q.shape[0], q.shape[1], 4096, gen)
    for inverse in (False, True):
        what = f"{dtype} {shape} {positions} inverse={inverse}"
        q_in, k_in = Guarded(q.shape, dtype, like=q), Guarded(k.shape, dtype, like=k)
        q_out, k_out = Guarded(q.shape, dtype), Guarded(k.shape, dtype)
        kernels.rotary(q_in.tensor, q_out.tensor, k_in.tensor, k_out.tensor, cos, sin, ids, offset, inverse)
        assert same_bits(q_in.tensor, q) and same_bits(k_in.tensor, k), what + ": out of place changed its input"
        check_rotary(q_out.tensor, q, cos, sin, table_rows, inverse, what + " out of place q")
        check_rotary(k_out.tensor, k, cos, sin, table_rows, inverse, what + " out of place k")
        kernels.rotary(q_in.tensor, q_in.tensor, k_in.tensor, k_in.tensor, cos, sin, ids, offset, inverse)
        check_rotary(q_in.tensor, q, cos, sin, table_rows, inverse, what + " in place q")
        check_rotary(k_in.tensor, k, cos, sin, table_rows, inverse, what + " in place k")
        assert all(g.guards_intact() for g in (q_in, k_in, q_out, k_out)), what + ": wrote outside a buffer"


@pytest.mark.parametrize("head_dim", [64, 10])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_on_fused_qkv_views(kernels, dtype, head_dim):
    """q and k as unbind views of one [b, s, heads, 3, head_dim] projection, and outputs with other
    layouts still (q contiguous, k a view of another fused buffer): the v slots must stay untouched."""
    gen = torch.Generator().manual_seed(8)
    rot = 32 if head_dim == 64 else 6
    cos, sin = rotary_tables(rot, 64)
    qkv = Guarded((2, 33, 4, 3, head_dim), dtype, like=torch.randn(2, 33, 4, 3, head_dim, generator=gen))
    original = qkv.tensor.clone()
    q, k, v = original.unbind(3)
    positions = torch.arange(33)[None]
    out_q = Guarded(q.shape, dtype)
    out_kv = Guarded((2, 33, 4, 2, head_dim), dtype)
    q_view, k_view, _ = qkv.tensor.unbind(3)
    assert not q_view.is_contiguous()
    kernels.rotary(q_view, out_q.tensor, k_view, out_kv.tensor[:, :, :, 0], cos, sin)
    check_rotary(out_q.tensor, q, cos, sin, positions, False, "strided q to contiguous")
    check_rotary(out_kv.tensor[:, :, :, 0], k, cos, sin, positions, False, "strided k to strided")
    assert torch.isnan(out_kv.tensor[:, :, :, 1]).all(), "wrote between the strided k output's heads"
    assert same_bits(qkv.tensor, original), "out of place changed the fused input"
    kernels.rotary(q_view, q_view, k_view, k_view, cos, sin, None, 5, True)  # in place, inverse, from offset 5
    check_rotary(q_view, q, cos, sin, positions + 5, True, "strided q in place")
    check_rotary(k_view, k, cos, sin, positions + 5, True, "strided k in place")
    assert same_bits(qkv.tensor[:, :, :, 2], v), "in place changed the v slots"
    assert all(g.guards_intact() for g in (qkv, out_q, out_kv)), "wrote outside a buffer"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_on_sequence_first_qkv_views(kernels, dtype):
    """Sequence parallel's layout: q and k are [b, s, heads, head_dim] views of a [s, b, heads, 3,
    head_dim] projection, so the sequence stride is larger than the batch stride. Per-batch position
    ids tell a kernel that mixes up the two strides from one that does not."""
    gen = torch.Generator().manual_seed(10)
    seq, batch, heads, head_dim = 13, 3, 4, 64
    cos, sin = rotary_tables(32, 64)
    qkv = Guarded(
        (seq, batch, heads, 3, head_dim), dtype, like=torch.randn(seq, batch, heads, 3, head_dim, generator=gen)
    )
    original = qkv.tensor.clone()
    q, k, v = (t.transpose(0, 1) for t in original.unbind(3))
    q_view, k_view, _ = (t.transpose(0, 1) for t in qkv.tensor.unbind(3))
    assert q_view.stride(1) > q_view.stride(0)
    ids = torch.randint(0, 64, (batch, seq), generator=gen)
    out_q, out_k = Guarded(q.shape, dtype), Guarded(k.shape, dtype)
    kernels.rotary(q_view, out_q.tensor, k_view, out_k.tensor, cos, sin, ids)
    check_rotary(out_q.tensor, q, cos, sin, ids, False, "sequence-first q")
    check_rotary(out_k.tensor, k, cos, sin, ids, False, "sequence-first k")
    assert same_bits(qkv.tensor, original), "out of place changed the fused input"
    kernels.rotary(q_view, q_view, k_view, k_view, cos, sin, ids, 0, True)  # in place, inverse
    check_rotary(q_view, q, cos, sin, ids, True, "sequence-first q in place")
    check_rotary(k_view, k, cos, sin, ids, True, "sequence-first k in place")
    assert same_bits(qkv.tensor[:, :, :, 2].transpose(0, 1), v), "in place changed the v slots"
    assert all(g.guards_intact() for g in (qkv, out_q, out_k)), "wrote outside a buffer"


@pytest.mark.parametrize("head_dim, row", [(66, 72), (64, 72), (34, 40)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_padded_head_rows(kernels, dtype, head_dim, row):
    """Heads of head_dim elements at a stride of `row` (padded rows): every stride is a multiple of the
    16-byte pack, so only head_dim % pack decides the path (66 and 34: scalar, or the pass-through tail
    would be left unwritten; 64: vectorised). The padding must stay untouched."""
    gen = torch.Generator().manual_seed(head_dim + row)
    cos, sin = rotary_tables(32, 64)
    batch, seq, q_heads, k_heads = 2, 19, 3, 2
    q = torch.randn(batch, seq, q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, seq, k_heads, head_dim, generator=gen).to(dtype)
    bufs = {
        name: Guarded((batch, seq, heads, row), dtype)
        for name, heads in (("q_in", q_heads), ("k_in", k_heads), ("q_out", q_heads), ("k_out", k_heads))
    }
    views = {name: g.tensor[..., :head_dim] for name, g in bufs.items()}
    views["q_in"].copy_(q)
    views["k_in"].copy_(k)
    positions = (2 + torch.arange(seq))[None]
    for inverse in (False, True):
        what = f"{dtype} head_dim {head_dim} in rows of {row} inverse={inverse}"
        kernels.rotary(views["q_in"], views["q_out"], views["k_in"], views["k_out"], cos, sin, None, 2, inverse)
        check_rotary(views["q_out"], q, cos, sin, positions, inverse, what + " q")
        check_rotary(views["k_out"], k, cos, sin, positions, inverse, what + " k")
        assert same_bits(views["q_in"], q) and same_bits(views["k_in"], k), what + ": changed the input"
    kernels.rotary(views["q_in"], views["q_in"], views["k_in"], views["k_in"], cos, sin, None, 2)
    check_rotary(views["q_in"], q, cos, sin, positions, False, f"{dtype} {head_dim}/{row} in place q")
    check_rotary(views["k_in"], k, cos, sin, positions, False, f"{dtype} {head_dim}/{row} in place k")
    for name, g in bufs.items():
        assert torch.isnan(g.tensor[..., head_dim:]).all(), f"wrote into the padding of {name}"
        assert g.guards_intact(), f"wrote outside {name}"


@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_q_only(kernels, inplace):
    """k_heads = 0 with null k pointers (as the kernel allows)."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, 9, 4, 64, generator=gen).to(torch.bfloat16)
    cos, sin = rotary_tables(32, 64)
    buf = Guarded(q.shape, q.dtype, like=q)
    out = buf if inplace else Guarded(q.shape, q.dtype)
    kernels.rotary(buf.tensor, out.tensor, None, None, cos, sin, None, 3)
    check_rotary(out.tensor, q, cos, sin, (3 + torch.arange(9))[None], False, f"q only, inplace={inplace}")
    assert buf.guards_intact() and out.guards_intact()


@pytest.mark.parametrize("pointer", ["q_in", "q_out", "k_in", "k_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_unaligned_pointer_takes_the_scalar_path(kernels, dtype, pointer):
    gen = torch.Generator().manual_seed(10)
    q, k = random_qk((2, 9, 4, 3, 64, 32), dtype, gen)
    cos, sin = rotary_tables(32, 64)
    bufs = {
        "q_in": Guarded(q.shape, dtype, like=q, misalign=pointer == "q_in"),
        "k_in": Guarded(k.shape, dtype, like=k, misalign=pointer == "k_in"),
        "q_out": Guarded(q.shape, dtype, misalign=pointer == "q_out"),
        "k_out": Guarded(k.shape, dtype, misalign=pointer == "k_out"),
    }
    kernels.rotary(*(bufs[name].tensor for name in ("q_in", "q_out", "k_in", "k_out")), cos, sin)
    positions = torch.arange(9)[None]
    check_rotary(bufs["q_out"].tensor, q, cos, sin, positions, False, f"unaligned {pointer}: q")
    check_rotary(bufs["k_out"].tensor, k, cos, sin, positions, False, f"unaligned {pointer}: k")
    assert all(g.guards_intact() for g in bufs.values())


def test_rotary_errors_come_back_as_exceptions(kernels):
    q = torch.randn(1, 2, 1, 8)
    cos, sin = rotary_tables(8, 4)
    with pytest.raises(RuntimeError, match="in place"):
        kernels.rotary(q, q, q, q.clone(), cos, sin)


# ----------------------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dtype_conversions_round_like_torch(kernels, dtype):
    """The CPU stand-ins for __half / __nv_bfloat16 (HIP-CPU's half, hip_cpu_compat.h's bf16) round to
    nearest-even like the GPU and torch: random bit patterns, ties, subnormals, overflow, inf and NaN."""
    gen = torch.Generator().manual_seed(12)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor(
        [
            0.0,
            -0.0,
            1.0,
            65504.0,
            65520.0,
            70000.0,
            2.0**-24,
            2.0**-25,
            3 * 2.0**-26,
            1 + 2.0**-11,
            1 + 3 * 2.0**-11,
            1 + 2.0**-8,
            1 + 3 * 2.0**-8,
            3.0e38,
            float("inf"),
            float("-inf"),
            float("nan"),
        ]
    )
    values = torch.cat([bits.view(torch.float32), specials, (torch.randn(10_000, generator=gen) * 1e-6)])
    got, want = kernels.round_floats(values, dtype), values.to(dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    assert same_bits(got[finite], want[finite]), f"fp32 -> {dtype} rounds differently from torch"
    assert same_bits(kernels.widen_to_floats(want[finite]), want[finite].float()), f"{dtype} -> fp32 is not exact"

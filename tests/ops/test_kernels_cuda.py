"""megaphi._cuda kernels against float64 references on a GPU (`pytest -m cuda`; skipped without one).

Every comparison upcasts: the reference is computed in float64 from the very same (rounded) inputs,
so the kernel's error is its fp32 arithmetic plus one rounding to the output dtype. Tolerances
(|got - want| <= atol + rtol * |want|), about one output ulp:
  LayerNorm y:        fp32 1e-5/1e-5, fp16 1e-3/1e-3, bf16 8e-3/8e-3 (rtol/atol)
  LayerNorm dx:       same rtol; atol scaled by max|dx_ref|
  dweight, dbias:     same rtol; atol = rtol * sqrt(rows) (sums of `rows` O(1) terms)
  mean, rstd (fp32):  1e-5 / 1e-4 relative
  rotary (fwd, bwd):  fp32 1e-5/1e-6, fp16 6e-4/1e-5, bf16 5e-3/1e-5
Outputs are pre-filled with NaN so a missed element fails.
"""

import math

import pytest
import torch

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LN_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ROPE_TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (6e-4, 1e-5), torch.bfloat16: (5e-3, 1e-5)}
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def kernels():
    from megaphi.ops import backend

    reason = backend.cuda_unavailable_reason()
    if reason is not None:
        pytest.fail(f"a GPU is present but the kernels are unusable: {reason}")
    return backend.cuda_module()


def stream():
    return torch.cuda.current_stream().cuda_stream


def nan_like(t, dtype=None):
    return torch.full_like(t, float("nan"), dtype=dtype)


def poison_allocator(nbytes):
    """Leave NaN bytes in the caching allocator so tensors the ops allocate next start as garbage."""
    block = torch.empty(nbytes // 4 + 1024, dtype=torch.float32, device="cuda")
    block.fill_(float("nan"))
    del block


def assert_close(got, want, rtol, atol, what):
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), f"{what}: NaN in the output (an element was never written)"
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax((err - bound).flatten()))
        pytest.fail(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; worst at flat index {i}: "
            f"got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r} (rtol {rtol}, atol {atol})"
        )


def random_ln_inputs(rows, hidden, dtype, seed=0, offset_elems=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # Never zeros: a shifted, scaled normal; weight away from zero.
    buf = torch.randn(rows * hidden + offset_elems, generator=gen, device="cuda") * 2 + 0.3
    x = buf.to(dtype)[offset_elems:].view(rows, hidden)
    weight = (torch.rand(hidden, generator=gen, device="cuda") + 0.5).to(dtype)
    bias = torch.randn(hidden, generator=gen, device="cuda").to(dtype)
    dy = torch.randn(rows, hidden, generator=gen, device="cuda").to(dtype)
    return x, weight, bias, dy


def reference_ln(x, weight, bias, dy, eps):
    x64 = x.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    b64 = bias.double().requires_grad_(True)
    y64 = torch.nn.functional.layer_norm(x64, (x.shape[-1],), w64, b64, eps)
    dx64, dw64, db64 = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    mean64 = x64.detach().mean(-1)
    rstd64 = 1.0 / torch.sqrt(x64.detach().var(-1, unbiased=False) + eps)
    return y64.detach(), mean64, rstd64, dx64, dw64, db64


def run_ln(kernels, x, weight, bias, dy, eps, num_blocks=None):
    rows, hidden = x.shape
    code, device = CODES[x.dtype], x.device.index
    y, mean, rstd = (
        nan_like(x),
        torch.full((rows,), float("nan"), device="cuda"),
        torch.full((rows,), float("nan"), device="cuda"),
    )
    kernels.layer_norm_forward(
        x.data_ptr(),
        weight.data_ptr(),
        bias.data_ptr(),
        y.data_ptr(),
        mean.data_ptr(),
        rstd.data_ptr(),
        rows,
        hidden,
        eps,
        code,
        device,
        stream(),
    )
    if num_blocks is None:
        num_blocks = max(1, min(rows, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    dx, dw, db = nan_like(x), nan_like(weight), nan_like(weight)
    workspace = torch.full((2, num_blocks, hidden), float("nan"), device="cuda")
    kernels.layer_norm_backward(
        dy.data_ptr(),
        x.data_ptr(),
        weight.data_ptr(),
        mean.data_ptr(),
        rstd.data_ptr(),
        dx.data_ptr(),
        dw.data_ptr(),
        db.data_ptr(),
        workspace.data_ptr(),
        num_blocks,
        rows,
        hidden,
        code,
        device,
        stream(),
    )
    torch.cuda.synchronize()
    return y, mean, rstd, dx, dw, db


def check_ln(got, want, rows, dtype, what):
    y, mean, rstd, dx, dw, db = got
    y64, mean64, rstd64, dx64, dw64, db64 = want
    tol = LN_TOL[dtype]
    assert_close(y, y64, tol, tol, f"{what} y")
    assert_close(mean, mean64, 1e-5, 1e-5, f"{what} mean")
    assert_close(rstd, rstd64, 1e-4, 0.0, f"{what} rstd")
    assert_close(dx, dx64, tol, tol * max(float(dx64.abs().max()), 1e-3), f"{what} dx")
    assert_close(dw, dw64, tol, tol * math.sqrt(rows), f"{what} dweight")
    assert_close(db, db64, tol, tol * math.sqrt(rows), f"{what} dbias")


@pytest.mark.parametrize("rows", [1, 3, 100_000])
@pytest.mark.parametrize("hidden", [1, 7, 1000, 1024, 2048, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_kernel_vs_float64(kernels, dtype, hidden, rows):
    x, weight, bias, dy = random_ln_inputs(rows, hidden, dtype)
    got = run_ln(kernels, x, weight, bias, dy, 1e-5)
    check_ln(got, reference_ln(x, weight, bias, dy, 1e-5), rows, dtype, f"{dtype} {rows}x{hidden}")


@pytest.mark.parametrize("hidden", [1024, 2048, 1000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_layer_norm_unaligned_pointers_take_the_scalar_path(kernels, dtype, hidden):
    x, weight, bias, dy = random_ln_inputs(37, hidden, dtype, seed=1, offset_elems=1)
    assert x.data_ptr() % 16 != 0
    got = run_ln(kernels, x, weight, bias, dy, 1e-5)
    check_ln(got, reference_ln(x, weight, bias, dy, 1e-5), 37, dtype, "unaligned")


@pytest.mark.parametrize("hidden", [7, 1000, 1024, 2048, 6112, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_low_variance_rows(kernels, dtype, hidden):
    """Rows of std 1e-3 (variance below eps = 1e-5), where eps decides rstd, on every path: warp forward
    (1024, 2048 in 16-bit), block forward, fast and block backward, partials in shared memory filling
    exactly 48 KiB (6112) and in the workspace (8192)."""
    x, weight, bias, dy = random_ln_inputs(300, hidden, dtype, seed=3)
    x = ((x.float() - 0.3) / 2 * 1e-3 + 3e-4).to(dtype)
    got = run_ln(kernels, x, weight, bias, dy, 1e-5)
    check_ln(got, reference_ln(x, weight, bias, dy, 1e-5), 300, dtype, f"std 1e-3 {dtype} 300x{hidden}")


def test_layer_norm_more_blocks_than_rows_and_determinism(kernels):
    x, weight, bias, dy = random_ln_inputs(3, 2048, torch.bfloat16, seed=2)
    got = run_ln(kernels, x, weight, bias, dy, 1e-5, num_blocks=64)
    check_ln(got, reference_ln(x, weight, bias, dy, 1e-5), 3, torch.bfloat16, "num_blocks > rows")
    x, weight, bias, dy = random_ln_inputs(50_000, 2048, torch.bfloat16, seed=3)
    first, second = run_ln(kernels, x, weight, bias, dy, 1e-5), run_ln(kernels, x, weight, bias, dy, 1e-5)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "the kernels must be deterministic run to run"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_autograd_function_and_module(kernels, dtype):
    from megaphi.ops import LayerNorm, layer_norm

    x, weight, bias, dy = random_ln_inputs(2 * 333, 2048, dtype, seed=4)
    x3 = x.view(2, 333, 2048).clone().requires_grad_(True)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    poison_allocator(64 << 20)
    y = layer_norm(x3, w, b, 1e-5, impl="cuda")
    y.backward(dy.view(2, 333, 2048))
    y64, _, _, dx64, dw64, db64 = reference_ln(x, weight, bias, dy, 1e-5)
    tol = LN_TOL[dtype]
    assert_close(y.view(-1, 2048), y64, tol, tol, "autograd y")
    assert_close(x3.grad.view(-1, 2048), dx64, tol, tol * float(dx64.abs().max()), "autograd dx")
    assert_close(w.grad, dw64, tol, tol * math.sqrt(666), "autograd dweight")
    assert_close(b.grad, db64, tol, tol * math.sqrt(666), "autograd dbias")
    module = LayerNorm(2048, device="cuda", dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    assert torch.equal(module(x3.detach()), y.detach()), "auto on CUDA must pick the kernel"


def test_layer_norm_rejects_non_contiguous_cuda_input(kernels):
    from megaphi.ops import layer_norm

    x = torch.randn(16, 8, device="cuda").t()
    with pytest.raises(ValueError, match="x is not contiguous"):
        layer_norm(x, torch.ones(16, device="cuda"), torch.zeros(16, device="cuda"), impl="cuda")


def test_auto_falls_back_to_torch_for_inputs_the_kernels_cannot_take(kernels):
    from megaphi.ops import apply_rotary_qk, layer_norm, layer_norm_reference, rotary_reference, rotary_tables

    x = torch.randn(16, 8, device="cuda").t()  # non-contiguous
    weight, bias = torch.randn(16, device="cuda"), torch.randn(16, device="cuda")
    assert torch.equal(layer_norm(x, weight, bias, impl="auto"), layer_norm_reference(x, weight, bias, 1e-5))
    cos, sin = rotary_tables(8, 16, device="cuda")
    q = torch.randn(1, 4, 8, 2, device="cuda").transpose(2, 3)  # last dim strided
    k = torch.randn(1, 4, 2, 8, device="cuda")
    q_rot, k_rot = apply_rotary_qk(q, k, cos, sin, impl="auto")
    assert torch.equal(q_rot, rotary_reference(q, cos, sin)) and torch.equal(k_rot, rotary_reference(k, cos, sin))


def test_kernel_image_probe_finds_an_image_for_every_visible_gpu(kernels):
    for device in range(torch.cuda.device_count()):
        assert kernels.kernel_image_error(device) == "", f"GPU {device}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_another_gpu_leave_the_current_device_alone(kernels):
    from megaphi.ops import apply_rotary_qk, layer_norm, rotary_tables

    torch.cuda.set_device(0)
    x = torch.randn(4, 1024, device="cuda:1", requires_grad=True)
    weight, bias = torch.ones(1024, device="cuda:1"), torch.zeros(1024, device="cuda:1")
    layer_norm(x, weight, bias, impl="cuda").sum().backward()
    assert torch.cuda.current_device() == 0
    cos, sin = rotary_tables(8, 16, device="cuda:1")
    q = torch.randn(1, 4, 2, 8, device="cuda:1")
    apply_rotary_qk(q, q.clone(), cos, sin, impl="cuda")
    kernels.kernel_image_error(1)
    assert torch.cuda.current_device() == 0
    assert torch.empty(1, device="cuda").device.index == 0


def strides(t):
    return t.stride()[:3]


def reference_rotary(x, cos, sin, positions, inverse=False):
    """float64 rotate-half with the fp32 tables upcast; positions [b or 1, s] int64."""
    half = cos.shape[1]
    c = cos.double()[positions][:, :, None, :]
    s = sin.double()[positions][:, :, None, :] * (-1.0 if inverse else 1.0)
    x64 = x.double()
    x1, x2 = x64[..., :half], x64[..., half : 2 * half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x64[..., 2 * half :]], dim=-1)


ROPE_SHAPES = [  # batch, seq, q_heads, k_heads, head_dim, rotary_dim
    (2, 128, 32, 32, 64, 32),  # phi-1 attention
    (4, 2048, 32, 32, 64, 32),  # a full phi-1 micro-batch
    (1, 7, 3, 3, 16, 16),  # full rotary
    (2, 5, 3, 2, 10, 6),  # odd sizes: scalar path, different head counts
    (1, 1, 1, 1, 2, 2),
]


@pytest.mark.parametrize("positions", ["none", "offset", "ids", "ids_shared"])
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_kernel_vs_float64(kernels, dtype, shape, positions):
    from megaphi.ops import rotary_tables

    batch, seq, hq, hk, head_dim, rot = shape
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = (torch.randn(batch, seq, hq, head_dim, generator=gen, device="cuda") + 0.1).to(dtype)
    k = (torch.randn(batch, seq, hk, head_dim, generator=gen, device="cuda") - 0.1).to(dtype)
    cos, sin = rotary_tables(rot, 4096, device="cuda")
    offset, ids, pos_ptr, pos_stride = 0, None, 0, 0
    if positions == "offset":
        offset = 1000
    if positions == "ids":
        ids = torch.randint(0, 4096, (batch, seq), generator=gen, device="cuda")
        pos_ptr, pos_stride = ids.data_ptr(), seq
    if positions == "ids_shared":
        ids = torch.randint(0, 4096, (1, seq), generator=gen, device="cuda")
        pos_ptr = ids.data_ptr()
    pos_table = ids if ids is not None else (offset + torch.arange(seq, device="cuda"))[None]
    rtol, atol = ROPE_TOL[dtype]
    for inverse in (False, True):
        want_q = reference_rotary(q, cos, sin, pos_table, inverse)
        want_k = reference_rotary(k, cos, sin, pos_table, inverse)
        q_out, k_out = nan_like(q), nan_like(k)  # out of place
        kernels.rotary(
            q.data_ptr(),
            q_out.data_ptr(),
            k.data_ptr(),
            k_out.data_ptr(),
            strides(q),
            strides(q_out),
            strides(k),
            strides(k_out),
            cos.data_ptr(),
            sin.data_ptr(),
            pos_ptr,
            pos_stride,
            offset,
            batch,
            seq,
            hq,
            hk,
            head_dim,
            rot // 2,
            inverse,
            CODES[dtype],
            0,
            stream(),
        )
        q_in, k_in = q.clone(), k.clone()  # in place
        kernels.rotary(
            q_in.data_ptr(),
            q_in.data_ptr(),
            k_in.data_ptr(),
            k_in.data_ptr(),
            strides(q_in),
            strides(q_in),
            strides(k_in),
            strides(k_in),
            cos.data_ptr(),
            sin.data_ptr(),
            pos_ptr,
            pos_stride,
            offset,
            batch,
            seq,
            hq,
            hk,
            head_dim,
            rot // 2,
            inverse,
            CODES[dtype],
            0,
            stream(),
        )
        torch.cuda.synchronize()
        for got_q, got_k, mode in ((q_out, k_out, "out of place"), (q_in, k_in, "in place")):
            what = f"{dtype} {shape} {positions} inverse={inverse} {mode}"
            assert_close(got_q, want_q, rtol, atol, what + " q")
            assert_close(got_k, want_k, rtol, atol, what + " k")
            assert torch.equal(got_q[..., rot:], q[..., rot:]), what + ": pass-through dims changed"


@pytest.mark.parametrize("head_dim, row", [(66, 72), (64, 72)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_heads_in_padded_rows(kernels, dtype, head_dim, row):
    """Heads of head_dim elements at a stride of `row`: 66 must take the scalar path (16-byte packs
    would leave the pass-through tail unwritten), 64 the vectorised one; the padding stays untouched."""
    from megaphi.ops import rotary_tables

    gen = torch.Generator(device="cuda").manual_seed(8)
    batch, seq, hq, hk = 2, 33, 4, 2
    bufs = [
        torch.full((batch, seq, heads, row), float("nan"), device="cuda", dtype=dtype) for heads in (hq, hk, hq, hk)
    ]
    q_in, k_in, q_out, k_out = (b[..., :head_dim] for b in bufs)
    q_in.copy_(torch.randn(q_in.shape, generator=gen, device="cuda"))
    k_in.copy_(torch.randn(k_in.shape, generator=gen, device="cuda"))
    cos, sin = rotary_tables(32, 64, device="cuda")
    pos = torch.arange(seq, device="cuda")[None]
    kernels.rotary(
        q_in.data_ptr(),
        q_out.data_ptr(),
        k_in.data_ptr(),
        k_out.data_ptr(),
        strides(q_in),
        strides(q_out),
        strides(k_in),
        strides(k_out),
        cos.data_ptr(),
        sin.data_ptr(),
        0,
        0,
        0,
        batch,
        seq,
        hq,
        hk,
        head_dim,
        16,
        False,
        CODES[dtype],
        0,
        stream(),
    )
    torch.cuda.synchronize()
    rtol, atol = ROPE_TOL[dtype]
    assert_close(q_out, reference_rotary(q_in, cos, sin, pos), rtol, atol, f"padded {head_dim}/{row} q")
    assert_close(k_out, reference_rotary(k_in, cos, sin, pos), rtol, atol, f"padded {head_dim}/{row} k")
    for b in bufs:
        assert torch.isnan(b[..., head_dim:]).all(), "wrote into the padding"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_autograd_function(kernels, dtype):
    from megaphi.ops import apply_rotary_qk, rotary_tables

    gen = torch.Generator(device="cuda").manual_seed(6)
    q = torch.randn(2, 64, 32, 64, generator=gen, device="cuda").to(dtype)
    k = torch.randn(2, 64, 32, 64, generator=gen, device="cuda").to(dtype)
    dq = torch.randn(q.shape, generator=gen, device="cuda").to(dtype)
    dk = torch.randn(k.shape, generator=gen, device="cuda").to(dtype)
    cos, sin = rotary_tables(32, 2048, device="cuda")
    ids = torch.randint(0, 2048, (2, 64), generator=gen, device="cuda")
    rtol, atol = ROPE_TOL[dtype]
    for kwargs, pos in (
        ({}, torch.arange(64, device="cuda")[None]),
        ({"position_ids": ids}, ids),
        ({"offset": 7}, 7 + torch.arange(64, device="cuda")[None]),
    ):
        qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        poison_allocator(64 << 20)
        q_rot, k_rot = apply_rotary_qk(qg, kg, cos, sin, impl="cuda", **kwargs)
        torch.autograd.backward((q_rot, k_rot), (dq, dk))
        assert_close(q_rot, reference_rotary(q, cos, sin, pos), rtol, atol, f"autograd q {kwargs}")
        assert_close(k_rot, reference_rotary(k, cos, sin, pos), rtol, atol, f"autograd k {kwargs}")
        assert_close(qg.grad, reference_rotary(dq, cos, sin, pos, inverse=True), rtol, atol, f"grad q {kwargs}")
        assert_close(kg.grad, reference_rotary(dk, cos, sin, pos, inverse=True), rtol, atol, f"grad k {kwargs}")
    # in place, under no_grad (generation)
    q_in, k_in = q.clone(), k.clone()
    with torch.no_grad():
        q_out, k_out = apply_rotary_qk(q_in, k_in, cos, sin, offset=3, inplace=True)
    assert q_out is q_in and k_out is k_in
    assert_close(q_in, reference_rotary(q, cos, sin, 3 + torch.arange(64, device="cuda")[None]), rtol, atol, "inplace")


@pytest.mark.parametrize("head_dim", [64, 10])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_on_views_of_a_fused_qkv(kernels, dtype, head_dim):
    """q and k as the model makes them: unbind views of one [b, s, heads, 3, head_dim] projection."""
    from megaphi.ops import apply_rotary_qk, rotary_tables

    gen = torch.Generator(device="cuda").manual_seed(7)
    qkv = torch.randn(2, 33, 4, 3, head_dim, generator=gen, device="cuda").to(dtype)
    q, k, _ = qkv.unbind(3)
    assert not q.is_contiguous()
    rot = 32 if head_dim == 64 else 6
    cos, sin = rotary_tables(rot, 64, device="cuda")
    pos = torch.arange(33, device="cuda")[None]
    rtol, atol = ROPE_TOL[dtype]
    want_q, want_k = reference_rotary(q, cos, sin, pos), reference_rotary(k, cos, sin, pos)
    q_rot, k_rot = apply_rotary_qk(q, k, cos, sin, impl="cuda")
    assert_close(q_rot, want_q, rtol, atol, "strided q")
    assert_close(k_rot, want_k, rtol, atol, "strided k")
    with torch.no_grad():
        apply_rotary_qk(q, k, cos, sin, impl="cuda", inplace=True)
    assert_close(qkv[:, :, :, 0], want_q, rtol, atol, "strided q in place")
    assert_close(qkv[:, :, :, 1], want_k, rtol, atol, "strided k in place")


def test_rotary_and_layer_norm_calls_never_block_the_host(kernels):
    """With CUDA's sync debug mode set to error, any host synchronization inside the wrappers (e.g.
    reading the position range back) raises."""
    from megaphi.ops import apply_rotary_qk, layer_norm, rotary_tables

    cos, sin = rotary_tables(32, 128, device="cuda")
    qkv = torch.randn(2, 64, 3 * 4 * 64, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[..., :256].view(2, 64, 4, 64), qkv[..., 256:512].view(2, 64, 4, 64)
    positions = torch.arange(64, device="cuda").expand(2, 64).contiguous()
    x = torch.randn(128, 1024, device="cuda", dtype=torch.bfloat16)
    weight, bias = (
        torch.ones(1024, device="cuda", dtype=torch.bfloat16),
        torch.zeros(1024, device="cuda", dtype=torch.bfloat16),
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        apply_rotary_qk(q, k, cos, sin, position_ids=positions, impl="cuda")
        apply_rotary_qk(q, k, cos, sin, offset=3, impl="cuda", inplace=True)
        layer_norm(x, weight, bias, 1e-5, impl="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_rotary_out_of_range_positions_fail_on_the_device(kernels):
    """The range check runs on the device (no host read): a bad position fails the stream."""
    import subprocess
    import sys

    code = (
        "import torch; from megaphi.ops import apply_rotary_qk, rotary_tables\n"
        "cos, sin = rotary_tables(8, 16, device='cuda')\n"
        "q = torch.randn(1, 4, 2, 8, device='cuda'); k = torch.randn(1, 4, 2, 8, device='cuda')\n"
        "apply_rotary_qk(q, k, cos, sin, position_ids=torch.tensor([[0, 1, 2, 99]], device='cuda'), impl='cuda')\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "assert" in (result.stderr + result.stdout).lower(), result.stderr[-2000:]

"""Rotary position embedding (rotate-half / NeoX convention, partial rotary).

Layout: q, k are [batch, seq, heads, head_dim]; the first rotary_dim dims of each head are
rotated, the rest pass through. cos/sin tables are fp32 [max_positions, rotary_dim // 2].
Positions: `position_ids` ([batch, seq], [1, seq] or [seq], int64) when given, else
`offset + arange(seq)` (generation continues at the cache length).

The torch reference is the spec: it casts cos/sin to the activation dtype and rounds like HF Phi.
The CUDA kernel rotates in fp32 and rounds once, so in fp16/bf16 the two differ by about one ulp.
"""

from typing import Optional

import torch

from . import backend


def rotary_tables(rotary_dim, max_positions, base=10000.0, device=None):
    """fp32 cos/sin tables [max_positions, rotary_dim // 2]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim))
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    return freqs.cos(), freqs.sin()


def _gather_tables(cos, sin, seq_len, position_ids, dtype, offset=0):
    """cos/sin for each token as [batch or 1, seq, 1, rotary_dim // 2], cast to the activation dtype."""
    if position_ids is None:
        c, s = cos[offset : offset + seq_len], sin[offset : offset + seq_len]
        c, s = c[None], s[None]
    else:
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        c, s = cos[position_ids], sin[position_ids]
    return c[:, :, None, :].to(dtype), s[:, :, None, :].to(dtype)


def rotary_reference(x, cos, sin, position_ids=None, offset=0):
    """Apply rotary to x [b, s, h, d]; returns a new tensor."""
    half = cos.shape[-1]
    rot = 2 * half
    c, s = _gather_tables(cos, sin, x.shape[1], position_ids, x.dtype, offset)
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    # rotate-half written as x*cos + rotate_half(x)*sin, the same rounding order as HF Phi.
    out1 = x1 * c + (-x2) * s
    out2 = x2 * c + x1 * s
    return torch.cat([out1, out2, rest], dim=-1)


def check_rotary_inputs(q, k, cos, sin, position_ids=None, offset=0):
    """Shapes, dtypes, devices and position range; raises ValueError/TypeError naming the problem."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"rotary: {name} must be [batch, seq, heads, head_dim], got {shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, seq and head_dim")
    if q.dtype != k.dtype or q.device != k.device:
        raise TypeError(f"rotary: q ({q.dtype}, {q.device}) and k ({k.dtype}, {k.device}) must share dtype and device")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32:
            raise TypeError(f"rotary: {name} table must be float32, got {t.dtype}")
        if t.dim() != 2 or tuple(t.shape) != tuple(cos.shape):
            raise ValueError(
                f"rotary: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be "
                "[max_positions, rotary_dim // 2]"
            )
        if t.device != q.device:
            raise ValueError(f"rotary: {name} table is on {t.device} but q is on {q.device}")
    max_positions, half = cos.shape
    if half < 1 or 2 * half > q.shape[3]:
        raise ValueError(
            f"rotary: rotary_dim {2 * half} (from cos {tuple(cos.shape)}) must be in [2, head_dim {q.shape[3]}]"
        )
    batch, seq = q.shape[:2]
    if position_ids is None:
        if offset < 0 or offset + seq > max_positions:
            raise ValueError(f"rotary: positions {offset}..{offset + seq - 1} exceed the table's {max_positions}")
        return
    if offset != 0:
        raise ValueError("rotary: give either position_ids or offset, not both")
    if position_ids.dtype != torch.int64 or position_ids.device != q.device:
        raise TypeError(
            f"rotary: position_ids must be int64 on {q.device}, got {position_ids.dtype} on {position_ids.device}"
        )
    if tuple(position_ids.shape) not in ((batch, seq), (1, seq), (seq,)):
        raise ValueError(
            f"rotary: position_ids shape {tuple(position_ids.shape)} must be [batch, seq], [1, seq] or "
            f"[seq] with batch={batch}, seq={seq}"
        )
    if position_ids.numel() == 0:
        return
    if position_ids.device.type == "cpu":
        low, high = int(position_ids.min()), int(position_ids.max())
        if low < 0 or high >= max_positions:
            raise ValueError(f"rotary: position_ids span {low}..{high}, outside the table's 0..{max_positions - 1}")
    else:
        # reading the range back would block the host on every call (and break CUDA-graph capture):
        # the device checks it and fails the stream instead, as an embedding lookup does
        torch._assert_async(((position_ids >= 0) & (position_ids < max_positions)).all())


def _element_spans(t):
    """(first element offset, sizes, strides) of t in its storage, in elements; dims of size 1 dropped."""
    dims = [(size, stride) for size, stride in zip(t.shape, t.stride()) if size != 1]
    return t.storage_offset(), [d[0] for d in dims], [d[1] for d in dims]


def _has_internal_overlap(t):
    """True when two indices of t may address the same element (stride 0, or dims that interleave)."""
    _, sizes, strides = _element_spans(t)
    reach = 0  # the largest offset the dims below can add
    for size, stride in sorted(zip(sizes, strides), key=lambda d: abs(d[1])):
        if stride == 0 or abs(stride) <= reach:
            return True
        reach += (size - 1) * abs(stride)
    return False


def _offset_reachable(delta, bounds, strides):
    """Is delta = sum_k j_k * strides[k] for integers lo_k <= j_k <= hi_k (bounds[k] = (lo_k, hi_k))?
    strides are positive and sorted ascending with each above the reach of the ones below, so at
    each level only the two multiples nearest delta / stride can work."""
    if not strides:
        return delta == 0
    stride, (lo, hi) = strides[-1], bounds[-1]
    below = sum(max(abs(b[0]), abs(b[1])) * s for b, s in zip(bounds[:-1], strides[:-1]))
    for j in {delta // stride, -(-delta // stride)}:
        if (
            lo <= j <= hi
            and abs(delta - j * stride) <= below
            and _offset_reachable(delta - j * stride, bounds[:-1], strides[:-1])
        ):
            return True
    return False


def views_may_overlap(a, b):
    """True when a and b (same dtype) may share an element. Exact for views that differ only in
    their sizes and starting offset (q and k sliced out of one fused qkv tensor), conservative
    (True) for other layouts within one storage. Reads only metadata: no device synchronization."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a_start, a_sizes, a_strides = _element_spans(a)
    b_start, b_sizes, b_strides = _element_spans(b)
    a_end = a_start + sum((n - 1) * s for n, s in zip(a_sizes, a_strides))
    b_end = b_start + sum((n - 1) * s for n, s in zip(b_sizes, b_strides))
    if a_end < b_start or b_end < a_start:
        return False
    if (
        a.shape[-1] != b.shape[-1]
        or a.stride() != b.stride()
        or any(s <= 0 for s in a.stride())
        or _has_internal_overlap(a)
        or _has_internal_overlap(b)
    ):
        return True
    # same strides: b's elements are a's lattice shifted by delta; they meet when delta is a
    # difference of two lattice points, sum_k j_k * stride_k with -(b_k - 1) <= j_k <= a_k - 1
    dims = sorted(
        (stride, (-(nb - 1), na - 1)) for stride, na, nb in zip(a.stride(), a.shape, b.shape) if na > 1 or nb > 1
    )
    reach = 0
    for stride, (lo, hi) in dims:
        if stride <= reach:  # dims interleave: the two-candidate search below would not be exact
            return True
        reach += max(-lo, hi) * stride
    return _offset_reachable(b_start - a_start, [d[1] for d in dims], [d[0] for d in dims])


def check_rotary_outputs(q, k):
    """In place, q and k are written: they must not share an element (the kernel would rotate it
    twice, racing with itself on a GPU), and neither may address one element twice."""
    for name, t in (("q", q), ("k", k)):
        if _has_internal_overlap(t):
            raise ValueError(
                f"rotary: in place, {name} (shape {tuple(t.shape)}, stride {t.stride()}) addresses "
                f"some elements more than once; pass a tensor that owns its elements or inplace=False"
            )
    if views_may_overlap(q, k):
        raise ValueError(
            f"rotary: in place, q (stride {q.stride()}, offset {q.storage_offset()}) and k (stride "
            f"{k.stride()}, offset {k.storage_offset()}) share memory; pass disjoint views or inplace=False"
        )


def rotary_kernel_problem(q, k, cos, sin, position_ids=None):
    """Why the CUDA kernel cannot take these (already check_rotary_inputs-valid) tensors, as
    (exception type, message), or None when it can. `auto` falls back to torch on a problem;
    an explicit "cuda" raises it (check_rotary_kernel_inputs)."""
    if q.dtype not in backend.DTYPE_CODES:
        return TypeError, (
            f"rotary (cuda): dtype {q.dtype} is not supported; use one of {sorted(str(d) for d in backend.DTYPE_CODES)}"
        )
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:  # other strides are fine: q and k are often views into a fused qkv
            return ValueError, (
                f"rotary (cuda): {name}'s last dim is not contiguous (shape {tuple(t.shape)}, "
                f"stride {t.stride()}); call .contiguous() first"
            )
    named = [("cos", cos), ("sin", sin)] + ([("position_ids", position_ids)] if position_ids is not None else [])
    for name, t in named:
        if not t.is_contiguous():
            return ValueError, (
                f"rotary (cuda): {name} is not contiguous (shape {tuple(t.shape)}, "
                f"stride {t.stride()}); call .contiguous() first"
            )
    for name, t in [("q", q), ("k", k)] + named:
        if not t.is_cuda:
            return ValueError, f"rotary (cuda): {name} is on {t.device}, not a CUDA device"
    return None


def check_rotary_kernel_inputs(q, k, cos, sin, position_ids=None):
    """What the CUDA kernel needs on top of check_rotary_inputs; raises ValueError/TypeError."""
    problem = rotary_kernel_problem(q, k, cos, sin, position_ids)
    if problem is not None:
        error_type, message = problem
        raise error_type(message)


def _launch_rotary(q_in, q_out, k_in, k_out, cos, sin, position_ids, offset, inverse):
    batch, seq, q_heads, head_dim = q_in.shape
    if position_ids is None:
        pos_ptr, pos_batch_stride = 0, 0
    else:
        pos_ptr = position_ids.data_ptr()
        pos_batch_stride = seq if (position_ids.dim() == 2 and position_ids.shape[0] == batch and batch > 1) else 0
    backend.cuda_module().rotary(
        q_in.data_ptr(),
        q_out.data_ptr(),
        k_in.data_ptr(),
        k_out.data_ptr(),
        q_in.stride()[:3],
        q_out.stride()[:3],
        k_in.stride()[:3],
        k_out.stride()[:3],
        cos.data_ptr(),
        sin.data_ptr(),
        pos_ptr,
        pos_batch_stride,
        offset,
        batch,
        seq,
        q_heads,
        k_in.shape[2],
        head_dim,
        cos.shape[1],
        inverse,
        backend.DTYPE_CODES[q_in.dtype],
        q_in.device.index,
        backend.current_stream_handle(q_in.device),
    )


class RotaryInPlaceCUDAFunction(torch.autograd.Function):
    """Rotary on q and k in place (eager only: torch.compile takes the out-of-place op below)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, offset):
        _launch_rotary(q, q, k, k, cos, sin, position_ids, offset, inverse=False)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.offset = offset
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        dq_in, dk_in = rotary_qk(dq, dk, cos, sin, position_ids, ctx.offset, True)
        return dq_in, dk_in, None, None, None, None


# The kernel as a torch custom op (torch.library), so torch.compile keeps it as one node sized by its
# fake implementation instead of breaking the graph. The CPU implementation does the kernel's
# arithmetic in torch (fp32 rotation, one rounding): the registration is testable without a GPU.


@torch.library.custom_op("megaphi::rotary_qk", mutates_args=(), device_types="cuda")
def rotary_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    offset: int,
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New contiguous (q, k) rotated by +angle (inverse: -angle, the backward)."""
    # the kernel takes any strides but a unit last one (gradients may arrive broadcast)
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(k, memory_format=torch.contiguous_format)
    if q.numel() and k.numel():
        _launch_rotary(q, q_out, k, k_out, cos, sin, position_ids, offset, inverse)
    return q_out, k_out


@rotary_qk.register_kernel("cpu")
def _rotary_qk_cpu(q, k, cos, sin, position_ids, offset, inverse):
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 like the kernel; float64 stays float64
    c, s = _gather_tables(cos, sin, q.shape[1], position_ids, acc, offset)
    s = -s if inverse else s
    half = cos.shape[1]

    def rotate(x):
        x1, x2, rest = x[..., :half].to(acc), x[..., half : 2 * half].to(acc), x[..., 2 * half :].to(acc)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


@rotary_qk.register_fake
def _rotary_qk_fake(q, k, cos, sin, position_ids, offset, inverse):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
    )


def _rotary_setup_context(ctx, inputs, output):
    _, _, cos, sin, position_ids, offset, inverse = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.offset, ctx.inverse = offset, inverse


def _rotary_grad(ctx, dq, dk):
    cos, sin, position_ids = ctx.saved_tensors
    dq_in, dk_in = rotary_qk(dq, dk, cos, sin, position_ids, ctx.offset, not ctx.inverse)
    return dq_in, dk_in, None, None, None, None, None


rotary_qk.register_autograd(_rotary_grad, setup_context=_rotary_setup_context)


def apply_rotary_qk(q, k, cos, sin, position_ids=None, impl=None, offset=0, inplace=False):
    """Rotary on q and k together; returns (q_rotated, k_rotated).

    offset: first position when position_ids is None (generation). inplace: overwrite q and k and
    return them (the torch path computes new tensors and copies them back, same effect).
    impl: None (the backend chosen with megaphi.ops.set_impl), "auto", "cuda" or "torch".
    """
    check_rotary_inputs(q, k, cos, sin, position_ids, offset)
    if inplace:
        check_rotary_outputs(q, k)
    chosen = backend.resolve("rotary", impl, q)
    if (
        chosen == "cuda"
        and backend.requested_impl("rotary", impl) == "auto"
        and rotary_kernel_problem(q, k, cos, sin, position_ids) is not None
    ):
        chosen = "torch"  # e.g. a view whose last dim is strided: auto keeps it working
    if chosen == "cuda" and q.numel() and k.numel():
        check_rotary_kernel_inputs(q, k, cos, sin, position_ids)
        if inplace:
            return RotaryInPlaceCUDAFunction.apply(q, k, cos, sin, position_ids, int(offset))
        return rotary_qk(q, k, cos, sin, position_ids, int(offset), False)
    q_rot = rotary_reference(q, cos, sin, position_ids, offset)
    k_rot = rotary_reference(k, cos, sin, position_ids, offset)
    if inplace:
        q.copy_(q_rot)
        k.copy_(k_rot)
        return q, k
    return q_rot, k_rot

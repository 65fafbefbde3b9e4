"""Rotary reference path (CPU): against a float64 complex-number rotation written here, against
transformers' Phi rotary, gradients, positions, input checks."""

import numpy as np
import pytest
import torch

from megaphi.ops import apply_rotary_qk, rotary_reference, rotary_tables
from megaphi.ops import backend
from megaphi.ops.rotary import check_rotary_kernel_inputs, rotary_kernel_problem


def numpy_angles(rotary_dim, positions, base=10000.0):
    inv_freq = base ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    return np.outer(np.asarray(positions, dtype=np.float64), inv_freq)  # [n, rotary_dim // 2]


def complex_rotary(x, angles=None, unit=None):
    """x [b, s, h, d] float64 numpy; angles [b or 1, s, half] (or the unit complex numbers
    themselves). Pair j is the complex number x[j] + i x[j + half], multiplied by exp(i angle_j);
    dims past 2 * half pass through."""
    if unit is None:
        unit = np.exp(1j * angles)
    half = unit.shape[-1]
    z = x[..., :half] + 1j * x[..., half : 2 * half]
    z = z * unit[:, :, None, :]
    return np.concatenate([z.real, z.imag, x[..., 2 * half :]], axis=-1)


def test_tables_match_float64_angles():
    cos, sin = rotary_tables(32, 2048)
    angles = numpy_angles(32, np.arange(2048))
    assert cos.dtype == torch.float32 and cos.shape == (2048, 16)
    # fp32 angle = position * inv_freq rounded: |error| <= ~2048 * 2**-24 rad.
    np.testing.assert_allclose(cos.numpy(), np.cos(angles), atol=3e-4)
    np.testing.assert_allclose(sin.numpy(), np.sin(angles), atol=3e-4)


@pytest.mark.parametrize("b,s,hq,hk,d,rot", [(2, 5, 3, 3, 64, 32), (1, 7, 2, 1, 16, 16), (2, 3, 1, 2, 10, 6)])
def test_reference_matches_complex_rotation(b, s, hq, hk, d, rot):
    gen = torch.Generator().manual_seed(0)
    cos, sin = rotary_tables(rot, 64)
    q = torch.randn(b, s, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, s, hk, d, generator=gen, dtype=torch.float64)
    # The same fp32 tables as complex numbers, so the comparison is exact up to float64 rounding.
    unit = (cos.double().numpy() + 1j * sin.double().numpy())[None, :s]
    q_rot, k_rot = apply_rotary_qk(q, k, cos, sin)
    np.testing.assert_allclose(q_rot.numpy(), complex_rotary(q.numpy(), unit=unit), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(k_rot.numpy(), complex_rotary(k.numpy(), unit=unit), rtol=1e-12, atol=1e-12)
    assert torch.equal(q_rot[..., rot:], q[..., rot:])


def test_positions_offset_and_ids_agree():
    gen = torch.Generator().manual_seed(1)
    cos, sin = rotary_tables(8, 32)
    q, k = torch.randn(2, 4, 2, 8, generator=gen), torch.randn(2, 4, 2, 8, generator=gen)
    by_offset = apply_rotary_qk(q, k, cos, sin, offset=5)
    ids = torch.arange(5, 9)
    for position_ids in (ids, ids[None], ids[None].expand(2, 4).contiguous()):
        by_ids = apply_rotary_qk(q, k, cos, sin, position_ids=position_ids)
        assert torch.equal(by_ids[0], by_offset[0]) and torch.equal(by_ids[1], by_offset[1])
    # Per-batch positions: row 1 uses its own ids.
    per_batch = torch.tensor([[0, 1, 2, 3], [9, 3, 7, 0]])
    q_rot, _ = apply_rotary_qk(q, k, cos, sin, position_ids=per_batch)
    angles = numpy_angles(8, [9, 3, 7, 0])[None]
    np.testing.assert_allclose(q_rot[1:].double().numpy(), complex_rotary(q[1:].double().numpy(), angles), atol=2e-5)


def test_reference_matches_transformers_phi_bitwise_in_bf16():
    phi = pytest.importorskip("transformers.models.phi.modeling_phi")
    gen = torch.Generator().manual_seed(2)
    cos, sin = rotary_tables(32, 128)
    q = torch.randn(2, 16, 4, 64, generator=gen).to(torch.bfloat16)
    k = torch.randn(2, 16, 4, 64, generator=gen).to(torch.bfloat16)
    position_ids = torch.arange(16)[None].expand(2, 16)
    # HF layout of the tables: full rotary_dim (both halves), cast to the activation dtype.
    cos_full = torch.cat([cos, cos], -1)[position_ids].to(torch.bfloat16)
    sin_full = torch.cat([sin, sin], -1)[position_ids].to(torch.bfloat16)
    q_hf, k_hf = phi.apply_rotary_pos_emb(q[..., :32], k[..., :32], cos_full, sin_full, unsqueeze_dim=2)
    q_ours, k_ours = apply_rotary_qk(q, k, cos, sin, position_ids=position_ids)
    assert torch.equal(q_ours[..., :32], q_hf) and torch.equal(k_ours[..., :32], k_hf)
    assert torch.equal(q_ours[..., 32:], q[..., 32:])


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    cos, sin = rotary_tables(4, 16)
    q = torch.randn(1, 3, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: apply_rotary_qk(a, b, cos, sin, offset=2), (q, k))


def test_inplace_torch_path_overwrites_inputs():
    cos, sin = rotary_tables(4, 16)
    q, k = torch.randn(1, 3, 2, 6), torch.randn(1, 3, 2, 6)
    expected = rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)
    q_out, k_out = apply_rotary_qk(q, k, cos, sin, inplace=True)
    assert q_out is q and k_out is k
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])


def test_rejects_bad_inputs():
    cos, sin = rotary_tables(8, 16)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads, head_dim\]"):
        apply_rotary_qk(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="must share batch, seq and head_dim"):
        apply_rotary_qk(q, torch.randn(1, 4, 2, 10), cos, sin)
    with pytest.raises(TypeError, match="must share dtype"):
        apply_rotary_qk(q, k.double(), cos, sin)
    with pytest.raises(TypeError, match="cos table must be float32"):
        apply_rotary_qk(q, k, cos.double(), sin)
    with pytest.raises(ValueError, match="rotary_dim 10 .* must be in"):
        apply_rotary_qk(q, k, *rotary_tables(10, 16))
    with pytest.raises(ValueError, match="exceed the table's 16"):
        apply_rotary_qk(q, k, cos, sin, offset=13)
    with pytest.raises(ValueError, match="outside the table's 0..15"):
        apply_rotary_qk(q, k, cos, sin, position_ids=torch.tensor([0, 1, 2, 16]))
    with pytest.raises(TypeError, match="position_ids must be int64"):
        apply_rotary_qk(q, k, cos, sin, position_ids=torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="position_ids shape"):
        apply_rotary_qk(q, k, cos, sin, position_ids=torch.arange(5))
    with pytest.raises(ValueError, match="either position_ids or offset"):
        apply_rotary_qk(q, k, cos, sin, position_ids=torch.arange(4), offset=1)


def test_kernel_input_checks():
    cos, sin = rotary_tables(8, 16)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="q's last dim is not contiguous"):
        check_rotary_kernel_inputs(torch.randn(1, 4, 8, 2).transpose(2, 3), k, cos, sin)
    with pytest.raises(ValueError, match="cos is not contiguous"):
        check_rotary_kernel_inputs(q, k, torch.randn(8, 16).t(), sin)
    with pytest.raises(TypeError, match="dtype torch.float64 is not supported"):
        check_rotary_kernel_inputs(q.double(), k.double(), cos, sin)
    with pytest.raises(ValueError, match="q is on cpu, not a CUDA device"):
        check_rotary_kernel_inputs(q, k, cos, sin)


def test_kernel_problem_names_what_the_kernel_cannot_take():
    cos, sin = rotary_tables(8, 16)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    strided_q = torch.randn(1, 4, 8, 2).transpose(2, 3)
    assert rotary_kernel_problem(strided_q, k, cos, sin)[0] is ValueError
    assert "q's last dim is not contiguous" in rotary_kernel_problem(strided_q, k, cos, sin)[1]
    assert "cos is not contiguous" in rotary_kernel_problem(q, k, torch.randn(8, 16).t(), sin)[1]
    assert rotary_kernel_problem(q.double(), k.double(), cos, sin)[0] is TypeError
    assert "q is on cpu" in rotary_kernel_problem(q, k, cos, sin)[1]


def test_auto_falls_back_to_torch_when_the_kernel_cannot_take_the_input(monkeypatch):
    # As if the dispatcher chose the kernel (CUDA tensors, usable GPU): "auto" must take the torch
    # path for a q whose last dim is strided; an explicit "cuda" must raise.
    monkeypatch.setattr(backend, "resolve", lambda op, impl, tensor: "cuda")
    monkeypatch.setattr(backend, "cuda_module", lambda: pytest.fail("the kernel must not be launched"))
    gen = torch.Generator().manual_seed(5)
    cos, sin = rotary_tables(8, 16)
    q = torch.randn(1, 4, 8, 2, generator=gen, dtype=torch.float64).float().transpose(2, 3)  # [1, 4, 2, 8]
    k = torch.randn(1, 4, 2, 8, generator=gen)
    angles = numpy_angles(8, range(4))[None]
    for impl in ("auto", None):
        got_q, got_k = apply_rotary_qk(q, k, cos, sin, impl=impl)
        np.testing.assert_allclose(got_q.numpy(), complex_rotary(q.double().numpy(), angles), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_k.numpy(), complex_rotary(k.double().numpy(), angles), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="q's last dim is not contiguous"):
        apply_rotary_qk(q, k, cos, sin, impl="cuda")


def _shared_elements_brute_force(a, b):
    """Independent: enumerate every storage offset each view addresses."""

    def offsets(t):
        index = torch.arange(t.untyped_storage().nbytes() // t.element_size())
        return set(torch.as_strided(index, t.shape, t.stride(), t.storage_offset()).flatten().tolist())

    return bool(offsets(a) & offsets(b))


def test_overlap_detection_never_misses_a_shared_element():
    """views_may_overlap against brute force on random fused-qkv-like layouts (padded strides, q and
    k with different head counts, arbitrary offsets): never False when an element is shared."""
    from megaphi.ops.rotary import views_may_overlap

    rng = np.random.default_rng(0)
    storage = torch.zeros(4000)
    exact = 0
    for _ in range(600):
        shape = [int(x) for x in rng.integers(1, 5, size=4)]
        head_stride = shape[3] + int(rng.integers(0, 7))
        seq_stride = head_stride * shape[2] + int(rng.integers(0, 7))
        batch_stride = seq_stride * shape[1] + int(rng.integers(0, 7))
        strides = (batch_stride, seq_stride, head_stride, 1)
        shape_b = shape[:2] + [int(rng.integers(1, 5)), shape[3]]
        a = torch.as_strided(storage, shape, strides, int(rng.integers(0, 300)))
        b = torch.as_strided(storage, shape_b, strides, int(rng.integers(0, 300)))
        shared = _shared_elements_brute_force(a, b)
        detected = views_may_overlap(a, b)
        assert detected or not shared, (shape, shape_b, strides, a.storage_offset(), b.storage_offset())
        exact += detected == shared
    assert exact >= 0.9 * 600  # conservative answers are rare, not the rule


def test_in_place_rejects_q_and_k_that_share_memory():
    cos, sin = rotary_tables(8, 16)
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="share memory"):
        apply_rotary_qk(x, x, cos, sin, inplace=True)
    flat = torch.randn(1, 4, 40)
    q, k = flat[..., :16].view(1, 4, 2, 8), flat[..., 8:24].view(1, 4, 2, 8)  # one head in common
    with pytest.raises(ValueError, match="share memory"):
        apply_rotary_qk(q, k, cos, sin, inplace=True)
    with pytest.raises(ValueError, match="more than once"):
        apply_rotary_qk(torch.randn(1, 4, 1, 8).expand(1, 4, 2, 8), torch.randn(1, 4, 2, 8), cos, sin, inplace=True)
    # out of place only reads them: allowed, and both results equal a rotation of x
    q_rot, k_rot = apply_rotary_qk(x, x, cos, sin)
    assert torch.equal(q_rot, k_rot)


def test_in_place_on_fused_qkv_views_matches_out_of_place():
    """q, k, v sliced from one [b, s, 3 * h * d] projection: disjoint, so in place is allowed."""
    cos, sin = rotary_tables(8, 16)
    qkv = torch.randn(2, 4, 3 * 2 * 8, generator=torch.Generator().manual_seed(1))
    q, k = qkv[..., :16].view(2, 4, 2, 8), qkv[..., 16:32].view(2, 4, 2, 8)
    expected_q, expected_k = apply_rotary_qk(q, k, cos, sin)
    v_before = qkv[..., 32:].clone()
    apply_rotary_qk(q, k, cos, sin, inplace=True)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k) and torch.equal(qkv[..., 32:], v_before)


def test_input_checks_read_no_tensor_values_off_the_cpu():
    """On a device the checks must not read positions back (a blocking sync per call, illegal in CUDA
    graph capture): tensors on the meta device have no values, so any read raises."""
    from megaphi.ops.rotary import check_rotary_inputs, check_rotary_outputs

    meta = torch.device("meta")
    cos, sin = rotary_tables(8, 16, device=meta)
    qkv = torch.empty(2, 4, 3 * 2 * 8, device=meta)
    q, k = qkv[..., :16].view(2, 4, 2, 8), qkv[..., 16:32].view(2, 4, 2, 8)
    positions = torch.empty(2, 4, dtype=torch.int64, device=meta)
    check_rotary_inputs(q, k, cos, sin, positions)
    check_rotary_outputs(q, k)
    with pytest.raises(ValueError, match="outside the table"):  # on the CPU the range is still checked eagerly
        check_rotary_inputs(
            torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8), *rotary_tables(8, 16), torch.full((2, 4), 16)
        )

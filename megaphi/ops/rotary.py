"""Rotary position embedding (rotate-half / NeoX convention, partial rotary).

Layout: q, k are [batch, seq, heads, head_dim]; the first rotary_dim dims of each head are
rotated, the rest pass through. cos/sin tables are fp32 [max_positions, rotary_dim // 2].
"""
import torch


def rotary_tables(rotary_dim, max_positions, base=10000.0, device=None):
    """fp32 cos/sin tables [max_positions, rotary_dim // 2]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim))
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    return freqs.cos(), freqs.sin()


def _gather_tables(cos, sin, seq_len, position_ids, dtype):
    """cos/sin for each token as [batch or 1, seq, 1, rotary_dim // 2], cast to the activation dtype."""
    if position_ids is None:
        c, s = cos[:seq_len], sin[:seq_len]
        c, s = c[None], s[None]
    else:
        c, s = cos[position_ids], sin[position_ids]
    return c[:, :, None, :].to(dtype), s[:, :, None, :].to(dtype)


def rotary_reference(x, cos, sin, position_ids=None):
    """Apply rotary to x [b, s, h, d]; returns a new tensor."""
    half = cos.shape[-1]
    rot = 2 * half
    c, s = _gather_tables(cos, sin, x.shape[1], position_ids, x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    # rotate-half written as x*cos + rotate_half(x)*sin, the same rounding order as HF Phi.
    out1 = x1 * c + (-x2) * s
    out2 = x2 * c + x1 * s
    return torch.cat([out1, out2, rest], dim=-1)


def apply_rotary_qk(q, k, cos, sin, position_ids=None, impl=None):
    """Rotary on q and k together; returns (q_rotated, k_rotated)."""
    return rotary_reference(q, cos, sin, position_ids), rotary_reference(k, cos, sin, position_ids)

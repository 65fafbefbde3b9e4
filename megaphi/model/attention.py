"""Causal self-attention core: flash_attn when usable, else torch SDPA. No T x T mask is built for
training or prefill; only a multi-token step on top of a non-empty KV cache builds a (q x kv) mask.

q, k, v are [batch, seq, heads, head_dim]; returns [batch, seq_q, heads, head_dim].
"""

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # optional dependency ([gpu] extra)
    _flash_attn_func = None


def flash_attn_available():
    return _flash_attn_func is not None


def _can_use_flash(q):
    return _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


ATTENTION_BACKENDS = ("auto", "flash-attn", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "math")


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def causal_attention(q, k, v, dropout_p=0.0, softmax_scale=None, use_flash=True, backend="auto"):
    """Causal attention where query i sits at absolute position (kv_len - q_len + i).

    The keys cover positions [0, kv_len), so kv_len > q_len means cached keys precede the queries.
    backend: "auto" (flash-attn when usable and use_flash, else SDPA's own choice), "flash-attn"
    (required: an error when it cannot run), or one SDPA kernel forced ("sdpa-flash", "sdpa-cudnn",
    "sdpa-efficient", "math"; torch raises when that kernel cannot take the inputs).
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend == "flash-attn" and not _can_use_flash(q):
        raise RuntimeError(
            "attention backend flash-attn: "
            + (
                "flash-attn is not installed"
                if _flash_attn_func is None
                else f"it takes CUDA fp16/bf16 tensors, got {q.dtype} on {q.device}"
            )
        )
    if backend not in ("auto", "flash-attn"):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([_sdpa_backend(backend)]):
            return _causal_attention(q, k, v, dropout_p, softmax_scale, use_flash=False)
    return _causal_attention(q, k, v, dropout_p, softmax_scale, use_flash=use_flash or backend == "flash-attn")


def _causal_attention(q, k, v, dropout_p, softmax_scale, use_flash):
    q_len, kv_len = q.shape[1], k.shape[1]
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    if use_flash and _can_use_flash(q):
        # flash-attn >= 2.1 aligns the causal mask to the bottom-right, i.e. exactly this offset.
        return _flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=True)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q_len == kv_len:
        out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, is_causal=True, scale=softmax_scale)
    elif q_len == 1:
        # one new token attends to everything cached: no mask at all
        out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, scale=softmax_scale)
    else:
        offset = kv_len - q_len
        rows = torch.arange(q_len, device=q.device).unsqueeze(1) + offset
        mask = torch.arange(kv_len, device=q.device).unsqueeze(0) <= rows
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    return out.transpose(1, 2)

"""Fused ops with plain-torch references: layer_norm, rotary.

Backends per op ("auto", "cuda", "torch", "apex" for LayerNorm): `set_impl(layernorm=..., rotary=...)`;
`python -m megaphi.ops` prints what is available here and why not.
"""

from .backend import get_impl, set_impl  # noqa: F401
from .layer_norm import LayerNorm, layer_norm, layer_norm_reference  # noqa: F401
from .rotary import apply_rotary_qk, rotary_reference, rotary_tables  # noqa: F401

"""Fused ops with plain-torch references: layer_norm, rotary."""
from .layer_norm import LayerNorm, layer_norm, layer_norm_reference  # noqa: F401
from .rotary import apply_rotary_qk, rotary_reference, rotary_tables  # noqa: F401

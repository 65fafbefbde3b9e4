"""The phi-1 model: `from megaphi.model import PhiConfig, PhiForCausalLM, ModelRuntime, apply_runtime`."""

from megaphi.config import PhiConfig, get_preset, num_parameters  # noqa: F401

from .kv_cache import KVCache  # noqa: F401
from .phi import PhiForCausalLM  # noqa: F401
from .runtime import ModelRuntime, apply_runtime  # noqa: F401

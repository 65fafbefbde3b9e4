"""The phi-1 model: `from megaphi.model import PhiConfig, PhiForCausalLM`."""
from megaphi.config import PhiConfig, get_preset, num_parameters  # noqa: F401

from .kv_cache import KVCache  # noqa: F401
from .phi import PhiForCausalLM  # noqa: F401

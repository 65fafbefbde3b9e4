"""megaphi: a Megatron-style training engine for phi-1-class code models."""

__version__ = "0.1.0"

"""Preallocated key/value cache for incremental decoding.

Per layer, keys and values are [batch, max_len, heads_per_rank, head_dim] (the flash-attn layout).
A forward with kv_cache writes its keys/values at positions [length, length + seq) of every layer
and then advances `length` once (PhiForCausalLM does this after the last layer).
"""

import torch


class KVCache:
    def __init__(self, num_layers, batch_size, max_length, num_heads, head_dim, dtype=torch.float32, device=None):
        shape = (num_layers, batch_size, max_length, num_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self):
        return self.keys.shape[1]

    @property
    def max_length(self):
        return self.keys.shape[2]

    def reset(self):
        self.length = 0

    def update(self, layer_idx, key, value):
        """Store key/value [batch, seq, heads, dim] after the cached ones; return all keys/values so far."""
        start, end = self.length, self.length + key.shape[1]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} positions needed, cache holds {self.max_length}")
        if key.shape[0] != self.batch_size:
            raise ValueError(f"KV cache batch {self.batch_size} != input batch {key.shape[0]}")
        self.keys[layer_idx, :, start:end] = key
        self.values[layer_idx, :, start:end] = value
        return self.keys[layer_idx, :, :end], self.values[layer_idx, :, :end]

    def advance(self, num_tokens):
        self.length += num_tokens

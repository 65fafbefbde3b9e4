"""Tensors inside guard bytes, to see kernel writes that land outside the buffer they were given."""

import torch

GUARD_BYTES = 64  # keeps the tensor 16-byte aligned (torch's CPU allocations are 64-byte aligned)
GUARD_PATTERN = 0x5A


class Guarded:
    """`tensor` of `shape` and `dtype`, filled with `fill` (or copied from `like`), sitting in a byte buffer
    with GUARD_BYTES of GUARD_PATTERN before and after it. `misalign` elements of extra offset make its
    pointer not 16-byte aligned (the kernels' scalar fallbacks)."""

    def __init__(self, shape, dtype, fill=float("nan"), like=None, misalign=0):
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for n in shape:
            numel *= n
        self.start = GUARD_BYTES + misalign * itemsize
        self.end = self.start + numel * itemsize
        self.raw = torch.full((self.end + GUARD_BYTES,), GUARD_PATTERN, dtype=torch.uint8)
        self.tensor = self.raw[self.start : self.end].view(dtype).view(shape)
        if like is not None:
            self.tensor.copy_(like)
        else:
            self.tensor.fill_(fill)
        assert (self.tensor.data_ptr() % 16 == 0) == (misalign * itemsize % 16 == 0)

    def guards_intact(self):
        return bool((self.raw[: self.start] == GUARD_PATTERN).all() and (self.raw[self.end :] == GUARD_PATTERN).all())


def same_bits(a, b):
    """Bitwise equality (NaN payloads included), for outputs that must be reproduced or left alone exactly."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))

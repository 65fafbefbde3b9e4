"""Tolerances for tests that compare two training runs which differ only in how float32 sums are
ordered (TP/SP sharding, ZeRO partitioning, micro-batch accumulation, data-parallel splits).

Such runs agree to last-bit noise, not bit for bit, and the noise depends on the CPU's matmul kernels.
Adam amplifies it: one weight's first update is lr * g / (|g| + eps), whose slope in g is at most
lr / eps. With the usual eps = 1e-8, noise of 1e-9 on a near-zero gradient moves a weight by ~0.1 * lr,
so a bound that holds on one CPU fails on another. (Float64 does not help through DeepSpeed: it
all-reduces and norms gradients in float32.)

So these comparisons run AdamW with eps = COMPARISON_ADAM_EPS = 0.1: the slope is then at most
10 * lr. Float32 gradient noise of these tiny models (O(1e-2) gradients summed over at most a few
thousand terms, u = 6e-8: <= 1e-6 absolute) moves a weight by <= 1e-5 * lr per step, i.e. <= 1e-7
at lr = 1e-2, and by <= COMPARISON_PARAM_TOL = 1e-6 over a few steps, with room. Adam's state (m, v),
its ZeRO partitioning, clipping and the lr schedule are exercised all the same; a wrong shard, a
missing all-reduce or a wrong scale moves weights by ~lr, four orders of magnitude above the bound.
"""

COMPARISON_ADAM_EPS = 0.1
COMPARISON_PARAM_TOL = 1e-6

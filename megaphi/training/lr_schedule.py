"""Learning-rate schedule: linear warmup, then linear / cosine / constant decay to min-lr.

Convention: the k-th *applied* optimizer update (k = 1, 2, ...) uses

    k <= warmup:            lr = max_lr * k / warmup
    warmup < k <= decay:    r = (k - warmup) / (decay - warmup)
                            linear:   lr = min_lr + (max_lr - min_lr) * (1 - r)
                            cosine:   lr = min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi * r))
                            constant: lr = max_lr
    k > decay:              lr = min_lr   (max_lr for constant)

so the first update already has a nonzero lr and update `decay` lands exactly on min_lr.
The DeepSpeed engine calls step() only after an applied update, never after a step skipped for
fp16 overflow, so skipped steps do not advance the schedule.
"""

import math


class WarmupDecayLR:
    def __init__(self, optimizer, max_lr, min_lr=0.0, warmup_iters=0, decay_iters=None, decay_style="linear"):
        if decay_style not in ("linear", "cosine", "constant"):
            raise ValueError(f"unknown lr decay style {decay_style!r}")
        if decay_iters is None:
            decay_iters = warmup_iters
        if warmup_iters > decay_iters:
            raise ValueError(f"warmup_iters {warmup_iters} > decay_iters {decay_iters}")
        self.optimizer = optimizer
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.warmup_iters = int(warmup_iters)
        self.decay_iters = int(decay_iters)
        self.decay_style = decay_style
        self.num_steps = 0  # applied updates so far
        self._apply(self.lr_at(1))

    def lr_at(self, k):
        """lr of the k-th applied update (1-based)."""
        if self.warmup_iters > 0 and k <= self.warmup_iters:
            return self.max_lr * k / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if k > self.decay_iters:
            return self.min_lr
        ratio = (k - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return self.min_lr + (self.max_lr - self.min_lr) * coeff

    def _apply(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def get_lr(self):
        """lr the next update will use (per param group, as torch schedulers report it)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self.get_lr()

    def step(self, increment=1, **_):
        self.num_steps += int(increment) if isinstance(increment, int) else 1
        self._apply(self.lr_at(self.num_steps + 1))

    def state_dict(self):
        return {
            "num_steps": self.num_steps,
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "warmup_iters": self.warmup_iters,
            "decay_iters": self.decay_iters,
            "decay_style": self.decay_style,
        }

    def load_state_dict(self, state):
        # The schedule's shape comes from the flags of this run; only the position is restored.
        self.num_steps = int(state["num_steps"])
        self._apply(self.lr_at(self.num_steps + 1))

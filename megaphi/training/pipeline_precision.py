"""bf16 / fp16 for pipelined stages: fp32 main weights, fp32 gradient accumulation, fp16 loss scaling.

What DeepSpeed's BF16_Optimizer (with immediate_grad_update) and fp16 optimizer do at P = 1, for the
parameters of one stage: the model computes in 16 bits; as soon as autograd has accumulated a
parameter's 16-bit gradient for a micro-batch it is added into an fp32 gradient and freed (so the
sum over the m micro-batches is formed in fp32); AdamW steps fp32 main copies of the weights, which
are then rounded into the model. fp16 multiplies the last stage's loss by the loss scale (the scaled
gradient reaches every stage through the backward transfers), divides the fp32 gradients by it, and
skips the step on every stage when any stage (any TP rank) found an inf or nan; the scale follows
DeepSpeed's dynamic rule (halve on overflow after `--hysteresis` overflows, double after
`--loss-scale-window` clean steps, never below `--min-loss-scale`).
"""

import torch
from torch import nn


class MainWeights:
    """fp32 copies of a 16-bit module's parameters, with hooks that accumulate fp32 gradients."""

    def __init__(self, module):
        self.pairs = []  # (model parameter, fp32 main parameter)
        self.main_of = {}
        for param in module.parameters():
            main = nn.Parameter(param.detach().float())
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel"):
                if hasattr(param, attr):
                    setattr(main, attr, getattr(param, attr))
            param.register_post_accumulate_grad_hook(self._accumulate_into(main))
            self.pairs.append((param, main))
            self.main_of[param] = main

    @staticmethod
    def _accumulate_into(main):
        def hook(param):
            if main.grad is None:
                main.grad = param.grad.float()
            else:
                main.grad.add_(param.grad)
            param.grad = None  # the 16-bit gradient is not kept (DeepSpeed's immediate_grad_update)

        return hook

    def groups(self, model_groups):
        """The optimizer's param groups over the main weights (same split, same settings)."""
        return [{**g, "params": [self.main_of[p] for p in g["params"]]} for g in model_groups]

    def parameters(self):
        return [main for _, main in self.pairs]

    def copy_to_model(self):
        with torch.no_grad():
            for param, main in self.pairs:
                param.copy_(main)  # rounded to the model's 16-bit dtype

    def copy_from_model(self):
        with torch.no_grad():
            for param, main in self.pairs:
                main.copy_(param)

    def state_dict(self):
        return [main.detach().cpu() for _, main in self.pairs]

    def load_state_dict(self, saved, source):
        if len(saved) != len(self.pairs):
            raise ValueError(f"{source}: {len(saved)} fp32 main weights for {len(self.pairs)} parameters")
        with torch.no_grad():
            for (_, main), value in zip(self.pairs, saved):
                main.copy_(value)


class DynamicLossScale:
    """fp16 loss scale with DeepSpeed's DynamicLossScaler rule (see the module docstring)."""

    def __init__(self, initial, window, hysteresis, minimum):
        self.scale, self.window, self.hysteresis, self.minimum = float(initial), int(window), int(hysteresis), minimum
        self.hysteresis_left = self.hysteresis
        self.iteration, self.last_overflow = 0, -1

    def update(self, overflow):
        if overflow:
            if self.hysteresis == 1 or self.hysteresis_left == 1:
                self.scale = max(self.scale / 2.0, self.minimum)
            else:
                self.hysteresis_left -= 1
            self.last_overflow = self.iteration
        elif (self.iteration - self.last_overflow) % self.window == 0:
            self.hysteresis_left = self.hysteresis
            self.scale *= 2.0
        self.iteration += 1

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, saved):
        for key, value in saved.items():
            setattr(self, key, value)


def scale_loss_func(forward_step, scale):
    """forward_step whose loss_func multiplies the backpropagated loss by `scale` (logs unchanged)."""

    def scaled_forward_step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)

        def scaled_loss_func(output_tensor):
            result = loss_func(output_tensor)
            return (result[0] * scale, *result[1:])

        return output, scaled_loss_func

    return scaled_forward_step

"""Megatron's forward/backward schedule without pipelining, on a DeepSpeed engine.

Contract (as in Megatron-LM):
    forward_step_func(data_iterator, model) -> (output_tensor, loss_func)
    loss_func(output_tensor) -> (loss, {"lm loss": tensor, ...})
where `loss` is the mean over the micro-batch's tokens.

Token averaging: every micro-batch holds micro_batch x seq_length tokens (pretraining has no loss
mask), so the per-micro-batch token means are equally weighted. DeepSpeed's engine.backward divides
each micro-batch loss by the accumulation steps and the gradient all-reduce averages over data-parallel
ranks, so the applied gradient is exactly that of
    (sum of every token loss in the global batch) / (global_batch_size x seq_length),
and micro-batch m x accumulation k equals micro-batch m*k.

The engine's own micro-step counter decides the accumulation boundary (ZeRO reduces gradients and the
optimizer steps on the last micro-batch); we check that it agrees with our micro-batch count.
"""
import contextlib

import torch


def _engine_of(model):
    return model if hasattr(model, "is_gradient_accumulation_boundary") else None


def forward_backward_no_pipelining(forward_step_func, data_iterator, model, num_microbatches,
                                   forward_only=False, collect_non_loss_data=False):
    """Run num_microbatches forward (and backward) passes; returns the list of per-micro-batch
    loss dicts (detached). With a DeepSpeed engine the caller then calls nothing else: engine.step()
    is called here after every micro-batch and applies the update on the boundary."""
    engine = _engine_of(model)
    losses_reduced = []
    grad_context = torch.no_grad() if forward_only else contextlib.nullcontext()
    for i in range(num_microbatches):
        is_last = i == num_microbatches - 1
        if engine is not None and not forward_only:
            at_boundary = engine.is_gradient_accumulation_boundary()
            if at_boundary != is_last:
                raise RuntimeError(
                    f"DeepSpeed's gradient accumulation counter disagrees with the schedule: micro-batch "
                    f"{i + 1}/{num_microbatches} but engine boundary={at_boundary} (gradient_accumulation_steps "
                    f"{engine.gradient_accumulation_steps()}); engine.step() was called outside the schedule?")
        with grad_context:
            output_tensor, loss_func = forward_step_func(data_iterator, model)
            result = loss_func(output_tensor)
        if collect_non_loss_data and forward_only:
            losses_reduced.append(result)
            continue
        loss, logs = result
        if not forward_only:
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                (loss / num_microbatches).backward()
        losses_reduced.append({k: (v.detach() if torch.is_tensor(v) else v) for k, v in logs.items()})
    return losses_reduced


def average_losses_across_data_parallel_group(values, group=None):
    """Mean of a list of scalar tensors over micro-batches and data-parallel ranks."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values]).mean()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size(group=group)
        if world > 1:
            stacked = stacked.clone()
            torch.distributed.all_reduce(stacked, group=group)
            stacked = stacked / world
    return stacked


def reduce_loss_dicts(losses_reduced, group=None):
    """[{name: tensor}, ...] per micro-batch -> {name: float} averaged over micro-batches and DP ranks."""
    if not losses_reduced:
        return {}
    out = {}
    for key in losses_reduced[0]:
        out[key] = average_losses_across_data_parallel_group([d[key] for d in losses_reduced], group).item()
    return out

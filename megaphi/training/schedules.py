"""Megatron's forward/backward schedule without pipelining, on a DeepSpeed engine.

Contract (as in Megatron-LM / Megatron-core):
    forward_step_func(data_iterator, model) -> (output_tensor, loss_func)
    loss_func(output_tensor) -> (loss_mean, {"lm loss": scalar, ...})                       # legacy
                             | (loss_sum, num_tokens, {"lm loss": tensor([loss_sum, num_tokens]), ...})

Token averaging. The applied gradient is that of
    (sum of every unmasked token loss in the global batch) / (unmasked tokens in the global batch),
the global batch being all micro-batches on all data-parallel ranks. That needs the total token count
before the first backward, so with count_tokens_func the schedule first pulls the step's micro-batches
from the data iterator, counts each one's tokens and all-reduces the total T over the data-parallel group;
forward_step_func then reads the prefetched micro-batches. DeepSpeed's engine.backward divides a loss by
the accumulation steps k and the gradient all-reduce averages over the dp ranks, so micro-batch i is
backpropagated as
    loss_sum_i * k * dp / T          (3-tuple), or
    loss_mean_i * n_i * k * dp / T   (2-tuple; n_i its counted tokens).
When every micro-batch holds the same number of tokens (pretraining: no loss mask), n_i * k * dp == T
and the factor is exactly 1: the legacy mean is backpropagated unchanged, bit for bit, and
micro-batch m x accumulation k equals micro-batch m*k. Without count_tokens_func a 2-tuple mean is
weighted equally (exact only for equal token counts) and a 3-tuple is an error. A plain module (no
engine) backpropagates loss_sum_i / T (x dp when a dp_group is given: a wrapper that averages like DDP).

The engine's own micro-step counter decides the accumulation boundary (ZeRO reduces gradients and the
optimizer steps on the last micro-batch); we check that it agrees with our micro-batch count.
"""

import contextlib

import torch


def _engine_of(model):
    return model if hasattr(model, "is_gradient_accumulation_boundary") else None


def _data_parallel(engine, dp_group):
    """(group, world size) that gradients are averaged over."""
    if dp_group is None and engine is not None:
        dp_group = getattr(engine, "data_parallel_group", None)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None, 1
    if engine is None and dp_group is None:
        return None, 1  # a plain module: no data-parallel reduction is known to happen
    return dp_group, torch.distributed.get_world_size(group=dp_group)


def _prefetch_and_count(data_iterator, num_microbatches, count_tokens_func, group, world, device):
    """Pull the step's micro-batches; returns (their iterator, per-micro-batch counts, global total).
    The counts come from CPU batches. With one rank, or ranks that reduce on the CPU (gloo), the total
    is a float; over NCCL it stays a device tensor, so the step never waits for the GPU to read it."""
    micro_batches = [next(data_iterator) for _ in range(num_microbatches)]
    counts = [float(count_tokens_func(b)) for b in micro_batches]
    if world == 1:
        return iter(micro_batches), counts, sum(counts)
    # a fill, not a host-to-device copy of a Python number (that copy would block the host)
    total = torch.full((), sum(counts), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total, group=group)
    return iter(micro_batches), counts, (total.item() if total.device.type == "cpu" else total)


def forward_backward_no_pipelining(
    forward_step_func,
    data_iterator,
    model,
    num_microbatches,
    forward_only=False,
    collect_non_loss_data=False,
    count_tokens_func=None,
    dp_group=None,
):
    """Run num_microbatches forward (and backward) passes; returns the list of per-micro-batch
    loss dicts (detached). With a DeepSpeed engine the caller then calls nothing else: engine.step()
    is called here after every micro-batch and applies the update on the boundary.

    count_tokens_func(micro_batch) -> number of tokens the micro-batch's loss averages over (what its
    loss_func's num_tokens is); given, the backward is an exact token average over the global batch
    (see the module docstring). dp_group defaults to the engine's data-parallel group."""
    engine = _engine_of(model)
    losses_reduced = []
    grad_context = torch.no_grad() if forward_only else contextlib.nullcontext()
    counts, total_tokens, scale_base = None, None, 1.0
    if count_tokens_func is not None and not forward_only:
        group, world = _data_parallel(engine, dp_group)
        device = _reduce_device(model, group) if world > 1 else torch.device("cpu")
        data_iterator, counts, total_tokens = _prefetch_and_count(
            data_iterator, num_microbatches, count_tokens_func, group, world, device
        )
        # what the engine undoes: / accumulation steps in backward, / dp ranks in the gradient average
        # (a plain module's backward accumulates as is)
        accumulation = engine.gradient_accumulation_steps() if engine is not None else 1
        scale_base = accumulation * world
    for i in range(num_microbatches):
        is_last = i == num_microbatches - 1
        if engine is not None and not forward_only:
            at_boundary = engine.is_gradient_accumulation_boundary()
            if at_boundary != is_last:
                raise RuntimeError(
                    f"DeepSpeed's gradient accumulation counter disagrees with the schedule: micro-batch "
                    f"{i + 1}/{num_microbatches} but engine boundary={at_boundary} (gradient_accumulation_steps "
                    f"{engine.gradient_accumulation_steps()}); engine.step() was called outside the schedule?"
                )
        with grad_context:
            output_tensor, loss_func = forward_step_func(data_iterator, model)
            result = loss_func(output_tensor)
        if collect_non_loss_data and forward_only:
            losses_reduced.append(result)
            continue
        if len(result) == 3:
            loss, _, logs = result
            weight = None  # loss is a sum over tokens
        elif len(result) == 2:
            loss, logs = result
            weight = None if counts is None else counts[i]
        else:
            raise ValueError(
                f"loss_func must return (loss, logs) or (loss_sum, num_tokens, logs); got a {len(result)}-tuple"
            )
        if not forward_only:
            if len(result) == 3 and total_tokens is None:
                raise ValueError(
                    "loss_func returned (loss_sum, num_tokens, logs) but the schedule got no "
                    "count_tokens_func: the global token count must be known before the first backward"
                )
            if torch.is_tensor(total_tokens):
                # on the device: exactly 1.0 (float64 ratio of equal integers) for equal-sized unmasked
                # micro-batches, and multiplying by 1.0 keeps them bit-exact
                factor = (scale_base * (1.0 if weight is None else weight)) / total_tokens.clamp(min=1.0)
                loss = loss * factor.to(loss.dtype)
            elif total_tokens is not None:
                factor = scale_base * (1.0 if weight is None else weight) / max(total_tokens, 1.0)
                if factor != 1.0:  # exactly 1 for equal-sized unmasked micro-batches: keep them bit-exact
                    loss = loss * factor
            if engine is not None:
                engine.backward(loss)
                engine.step()
            elif total_tokens is not None:
                loss.backward()
            else:
                (loss / num_microbatches).backward()
        losses_reduced.append({k: (v.detach() if torch.is_tensor(v) else v) for k, v in logs.items()})
    return losses_reduced


def _reduce_device(model, group):
    # NCCL reduces CUDA tensors only; gloo CPU tensors.
    if torch.distributed.is_initialized() and torch.distributed.get_backend(group) == "nccl":
        return next(model.parameters()).device
    return torch.device("cpu")


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


def reduce_loss_tensors(losses_reduced, group=None):
    """[{name: value}, ...] per micro-batch -> {name: 0-dim float64 tensor} over micro-batches and DP
    ranks, computed where the values live (no host synchronization; read them at log time).
    A scalar value is averaged with equal weights; a 2-element tensor [sum, count] (the 3-tuple
    loss_func convention) is summed element-wise and reduced to sum / count (a token average; nan
    when the count is 0). Every micro-batch on every rank must log the same form for a key."""
    if not losses_reduced:
        return {}
    out = {}
    for key in losses_reduced[0]:
        values = [d[key] for d in losses_reduced]
        pairs = [torch.is_tensor(v) and v.numel() == 2 for v in values]
        if not any(pairs):
            out[key] = average_losses_across_data_parallel_group(values, group).double()
            continue
        if not all(pairs):
            raise ValueError(
                f"loss dicts mix a scalar and a [sum, count] pair for {key!r} within one step; "
                f"loss_func must return the same form for every micro-batch"
            )
        total = torch.stack([v.detach().double().reshape(2) for v in values]).sum(dim=0)
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size(group=group) > 1
        ):
            torch.distributed.all_reduce(total, group=group)
        # fractional loss_mask weights may total below 1; only an empty count (no token weighted in
        # anywhere) has no average: nan
        loss_sum, count = total[0], total[1]
        out[key] = torch.where(count != 0, loss_sum / count, torch.full_like(count, float("nan")))
    return out


def reduce_loss_dicts(losses_reduced, group=None):
    """reduce_loss_tensors, read back as Python floats (one host synchronization)."""
    tensors = reduce_loss_tensors(losses_reduced, group)
    if not tensors:
        return {}
    values = torch.stack(list(tensors.values())).tolist()
    return dict(zip(tensors, values))

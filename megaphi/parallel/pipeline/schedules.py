"""Pipeline schedules: run a plan (plan.py) on this rank's model chunks with real tensors.

Contract (Megatron's, as forward_backward_no_pipelining in megaphi/training/schedules.py):
    forward_step_func(data_iterator, model_chunk) -> (output_tensor, loss_func)
    loss_func(output_tensor) -> (loss_mean, logs) | (loss_sum, num_tokens, logs)
forward_step_func runs on every stage; a chunk without the embedding takes its input from
set_input_tensor (the executor sets it), and loss_func is applied on the chunk holding the loss only.

Loss averaging is exactly that of forward_backward_no_pipelining on a plain module: with
count_tokens_func the chunk holding the loss pulls the step's micro-batches first, all-reduces their
token count T over dp_group, and backpropagates micro-batch i as loss_sum_i * dp / T (or
loss_mean_i * n_i * dp / T, the factor skipped where it is exactly 1); without it, loss_mean_i / m.
The factor enters at the loss, so every stage's gradients carry it through the backward sends. dp is
the size of dp_group (1 without one): gradients are then averaged over it by the caller, as DDP does
(allreduce_data_parallel_gradients).
"""

import contextlib
import time

import torch
import torch.distributed as dist

from megaphi.parallel import state

from .plan import Backward, Communicate, Forward, Routing, build_plan, forward_only_plan


def _iterators_per_chunk(data_iterator, num_chunks):
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) != num_chunks:
            raise ValueError(f"pipeline schedule: {len(data_iterator)} data iterators for {num_chunks} model chunks")
        return list(data_iterator)
    if num_chunks > 1:
        # chunks read their micro-batches at different times: one shared iterator would mix them up
        raise ValueError("interleaved pipeline schedule: pass one data iterator per model chunk")
    return [data_iterator]


def _count_tokens(data_iterator, num_microbatches, count_tokens_func, dp_group):
    """(iterator over the prefetched micro-batches, counts, global total, dp world size)."""
    micro_batches = [next(data_iterator) for _ in range(num_microbatches)]
    counts = [float(count_tokens_func(b)) for b in micro_batches]
    world = dist.get_world_size(group=dp_group) if dp_group is not None else 1
    if world == 1:
        return iter(micro_batches), counts, sum(counts), world
    # NCCL reduces device tensors only; the one read back is a host sync per step, at the step's start
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(dp_group) == "nccl" else "cpu"
    total = torch.full((), sum(counts), dtype=torch.float64, device=device)
    dist.all_reduce(total, group=dp_group)
    return iter(micro_batches), counts, total.item(), world


def _loss_to_backpropagate(result, index, num_microbatches, counts, total, scale_base):
    """The scalar whose backward this micro-batch contributes, and its logs (detached)."""
    if len(result) == 3:
        loss, _, logs = result
        if total is None:
            raise ValueError(
                "loss_func returned (loss_sum, num_tokens, logs) but the schedule got no "
                "count_tokens_func: the global token count must be known before the first backward"
            )
        weight = None
    elif len(result) == 2:
        loss, logs = result
        weight = None if counts is None else counts[index]
    else:
        raise ValueError(
            f"loss_func must return (loss, logs) or (loss_sum, num_tokens, logs); got a {len(result)}-tuple"
        )
    if total is None:
        loss = loss / num_microbatches
    else:
        factor = scale_base * (1.0 if weight is None else weight) / max(total, 1.0)
        if factor != 1.0:  # the same expression and skip as forward_backward_no_pipelining
            loss = loss * factor
    return loss, {k: (v.detach() if torch.is_tensor(v) else v) for k, v in logs.items()}


class _Executor:
    def __init__(
        self, chunks, iterators, forward_step_func, communicator, rank, size, num_microbatches, forward_only, loss_state
    ):
        self.chunks, self.iterators, self.forward_step = chunks, iterators, forward_step_func
        self.comm, self.forward_only = communicator, forward_only
        self.routing = Routing(rank, size, len(chunks))
        self.m = num_microbatches
        self.counts, self.total, self.scale_base = loss_state
        self.inputs, self.output_grads = {}, {}  # received, keyed by (chunk, micro-batch)
        self.outgoing_activations, self.outgoing_grads = {}, {}  # keyed by the receiver's label
        self.stored = {}  # (chunk, mb) -> (input, output) awaiting backward
        self.max_live = 0
        self.compute_seconds = 0.0  # host time in forward and backward steps
        self.losses = []

    def forward(self, chunk, mb):
        model = self.chunks[chunk]
        x = None
        if not self.routing.is_first_virtual(chunk):
            x = self.inputs.pop((chunk, mb))
            if not self.forward_only:
                x.requires_grad_(True)
        model.set_input_tensor(x)
        grad_context = torch.no_grad() if self.forward_only else contextlib.nullcontext()
        with grad_context:
            output, loss_func = self.forward_step(self.iterators[chunk], model)
            if self.routing.is_last_virtual(chunk):
                result = loss_func(output)
                if self.forward_only:
                    logs = result[-1]
                    self.losses.append({k: (v.detach() if torch.is_tensor(v) else v) for k, v in logs.items()})
                    return
                output, logs = _loss_to_backpropagate(result, mb, self.m, self.counts, self.total, self.scale_base)
                self.losses.append(logs)
        label = self.routing.output_to_next(chunk, mb)
        if label is not None:
            self.outgoing_activations[label] = output.detach()
        if not self.forward_only:
            self.stored[(chunk, mb)] = (x, output)
            self.max_live = max(self.max_live, len(self.stored))

    def backward(self, chunk, mb):
        x, output = self.stored.pop((chunk, mb))
        if self.routing.is_last_virtual(chunk):
            torch.autograd.backward(output)
        else:
            torch.autograd.backward(output, grad_tensors=self.output_grads.pop((chunk, mb)))
        label = self.routing.gradient_to_prev(chunk, mb)
        if label is not None:
            self.outgoing_grads[label] = x.grad

    def communicate(self, step):
        from_prev, from_next = self.comm.communicate(
            send_next=None if step.send_next is None else self.outgoing_activations.pop(step.send_next),
            send_prev=None if step.send_prev is None else self.outgoing_grads.pop(step.send_prev),
            recv_prev=step.recv_prev is not None,
            recv_next=step.recv_next is not None,
        )
        if step.recv_prev is not None:
            self.inputs[step.recv_prev] = from_prev
        if step.recv_next is not None:
            self.output_grads[step.recv_next] = from_next

    def run(self, plan):
        for step in plan:
            if isinstance(step, Communicate):
                self.communicate(step)
                continue
            start = time.perf_counter()
            if isinstance(step, Forward):
                self.forward(step.chunk, step.microbatch)
            elif isinstance(step, Backward):
                self.backward(step.chunk, step.microbatch)
            else:
                raise TypeError(f"unknown pipeline plan step {step!r}")
            self.compute_seconds += time.perf_counter() - start
        leftovers = [
            d
            for d in (self.inputs, self.output_grads, self.outgoing_activations, self.outgoing_grads, self.stored)
            if d
        ]
        if leftovers:
            raise RuntimeError(f"pipeline schedule ended with unconsumed tensors: {leftovers}")


def forward_backward_pipelining(
    forward_step_func,
    data_iterator,
    model,
    num_microbatches,
    communicator=None,
    forward_only=False,
    count_tokens_func=None,
    dp_group=None,
    pipeline_rank=None,
    pipeline_size=None,
    stats=None,
):
    """Run one step's micro-batches through this rank's model chunks with 1F1B (one chunk) or
    interleaved 1F1B (a list of chunks, chunk c holding virtual stage c * P + rank). data_iterator:
    one iterator, or one per chunk. Returns the per-micro-batch loss logs on the rank holding the loss
    (in micro-batch order) and [] elsewhere. Gradients accumulate in the chunks' .grad; the caller
    then reduces them over data parallelism and steps the optimizer. stats (a dict), if given,
    receives "max_live_activations": the most micro-batch activations this rank held at once, and
    "compute_seconds": host time spent in forward and backward steps (the rest of the step is
    waiting: the bubble and communication; on a GPU it measures launches, not kernels)."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    v = len(chunks)
    rank = state.get_pipeline_model_parallel_rank() if pipeline_rank is None else pipeline_rank
    size = state.get_pipeline_model_parallel_world_size() if pipeline_size is None else pipeline_size
    if size > 1 and communicator is None:
        raise ValueError("pipeline schedule: a StageCommunicator is needed with --pipeline-model-parallel-size > 1")
    iterators = _iterators_per_chunk(data_iterator, v)
    plan = (forward_only_plan if forward_only else build_plan)(rank, size, num_microbatches, v)
    counts, total, scale_base = None, None, 1.0
    holds_loss = rank == size - 1
    if count_tokens_func is not None and not forward_only and holds_loss:
        iterators[v - 1], counts, total, scale_base = _count_tokens(
            iterators[v - 1], num_microbatches, count_tokens_func, dp_group
        )
        scale_base = float(scale_base)
    executor = _Executor(
        chunks,
        iterators,
        forward_step_func,
        communicator,
        rank,
        size,
        num_microbatches,
        forward_only,
        (counts, total, scale_base),
    )
    try:
        executor.run(plan)
    finally:
        for chunk in chunks:
            chunk.set_input_tensor(None)
    if stats is not None:
        stats["max_live_activations"] = executor.max_live
        stats["compute_seconds"] = executor.compute_seconds
    return executor.losses


def allreduce_data_parallel_gradients(chunks, group=None):
    """Average the chunks' gradients over the data-parallel group (what DDP does after backward)."""
    group = state.get_data_parallel_group() if group is None else group
    world = dist.get_world_size(group=group)
    if world == 1:
        return
    for chunk in chunks:
        for param in chunk.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad, group=group)
                param.grad.div_(world)


def global_grad_norm(chunks, norm_type=2.0):
    """The 2-norm of the whole model's gradient: squares summed over this rank's chunks (sharded
    parameters on every TP rank, replicated ones on TP rank 0 only), then over TP and pipeline ranks."""
    if norm_type != 2.0:
        raise ValueError("global_grad_norm supports the 2-norm only")
    first = next(iter(chunks[0].parameters()))
    total = torch.zeros((), dtype=torch.float64, device=first.device)
    tp_rank = state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for param in chunk.parameters():
            if param.grad is None or (not getattr(param, "tensor_model_parallel", False) and tp_rank != 0):
                continue
            total += param.grad.double().pow(2).sum()
    for group in (state.get_tensor_model_parallel_group(), state.get_pipeline_model_parallel_group()):
        if group is not None and dist.get_world_size(group=group) > 1:
            dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_grad_norm_across_stages(chunks, max_norm):
    """Scale every stage's gradients by min(1, max_norm / (norm + 1e-6)), the norm being that of the
    whole model (global_grad_norm), so all stages clip by the same factor. Returns the norm."""
    norm = global_grad_norm(chunks)
    coefficient = max_norm / (norm + 1e-6)
    if coefficient < 1.0:
        for chunk in chunks:
            for param in chunk.parameters():
                if param.grad is not None:
                    param.grad.mul_(coefficient.to(param.grad.dtype))
    return norm


def any_stage_overflowed(chunks):
    """fp16 loss scaling: whether any stage (any TP rank of it) has a non-finite gradient. Every rank
    gets the same answer, so all stages skip the step and lower the scale together."""
    first = next(iter(chunks[0].parameters()))
    found = torch.zeros((), dtype=torch.float32, device=first.device)
    for chunk in chunks:
        for param in chunk.parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                found.fill_(1.0)
    for group in (state.get_tensor_model_parallel_group(), state.get_pipeline_model_parallel_group()):
        if group is not None and dist.get_world_size(group=group) > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    return bool(found.item())

"""The order of work on one pipeline rank, as a list of instructions (no tensors, no communication).

A plan is what a schedule decides: which model chunk runs forward or backward on which micro-batch,
and which point-to-point transfers are batched together between the computations. Keeping it apart
from the executor (schedules.py) lets tests check a schedule for every (P, v, m) without processes:
that every receive gets the tensor it expects, that no rank ever waits for a peer that waits for it,
and how many activations a rank holds at once.

Instructions:
    Forward(chunk, microbatch), Backward(chunk, microbatch)
    Communicate(send_next, send_prev, recv_prev, recv_next): one batch of isend/irecv; each field is
    None or a (chunk, microbatch) label. Labels name the *receiving* side's (chunk, microbatch):
    send_next carries an activation to the next rank, send_prev an activation gradient to the
    previous rank. Ranks form a ring, so with interleaving the last rank's chunk c feeds the first
    rank's chunk c + 1.

Model chunk c on pipeline rank r holds virtual stage c * P + r (Megatron's interleaving): virtual
stage 0 (chunk 0 on rank 0) holds the embedding, virtual stage v*P - 1 the loss.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Forward:
    chunk: int
    microbatch: int


@dataclass(frozen=True)
class Backward:
    chunk: int
    microbatch: int


@dataclass(frozen=True)
class Communicate:
    send_next: Optional[tuple] = None
    send_prev: Optional[tuple] = None
    recv_prev: Optional[tuple] = None
    recv_next: Optional[tuple] = None

    def is_empty(self):
        return self.send_next is None and self.send_prev is None and self.recv_prev is None and self.recv_next is None


def check_schedule_arguments(pipeline_size, num_microbatches, num_chunks=1):
    """One-line errors for schedules that cannot run."""
    if pipeline_size < 1 or num_microbatches < 1 or num_chunks < 1:
        raise ValueError(
            f"pipeline schedule: --pipeline-model-parallel-size {pipeline_size}, {num_microbatches} "
            f"micro-batches and {num_chunks} virtual stages per rank must all be >= 1"
        )
    if num_chunks > 1 and pipeline_size > 1 and num_microbatches % pipeline_size != 0:
        raise ValueError(
            f"interleaved schedule (--num-layers-per-virtual-pipeline-stage): the number of "
            f"micro-batches {num_microbatches} must be a multiple of "
            f"--pipeline-model-parallel-size {pipeline_size}"
        )


class Routing:
    """Where this rank's outputs go and what it receives next, per chunk and direction."""

    def __init__(self, rank, pipeline_size, num_chunks):
        self.rank, self.size, self.chunks = rank, pipeline_size, num_chunks
        self.activations_received = [0] * num_chunks
        self.gradients_received = [0] * num_chunks

    def is_first_virtual(self, chunk):
        return self.rank == 0 and chunk == 0

    def is_last_virtual(self, chunk):
        return self.rank == self.size - 1 and chunk == self.chunks - 1

    def output_to_next(self, chunk, microbatch):
        """Label of an activation sent forward, or None where the loss is computed."""
        if self.is_last_virtual(chunk):
            return None
        return (chunk + 1 if self.rank == self.size - 1 else chunk, microbatch)

    def gradient_to_prev(self, chunk, microbatch):
        """Label of an input gradient sent backward, or None on the embedding's stage."""
        if self.is_first_virtual(chunk):
            return None
        return (chunk - 1 if self.rank == 0 else chunk, microbatch)

    # Tensors for one chunk arrive in micro-batch order: the sender runs that chunk's micro-batches in order.
    def next_activation(self, chunk):
        label = (chunk, self.activations_received[chunk])
        self.activations_received[chunk] += 1
        return label

    def next_gradient(self, chunk):
        label = (chunk, self.gradients_received[chunk])
        self.gradients_received[chunk] += 1
        return label


def _append(plan, comm):
    if not comm.is_empty():
        plan.append(comm)


def one_forward_one_backward(rank, pipeline_size, num_microbatches):
    """Megatron's non-interleaved 1F1B: min(P - rank - 1, m) warm-up forwards, then one forward and
    one backward per step, then the remaining backwards. Stage 0 holds at most P micro-batches'
    activations at once, whatever m is."""
    check_schedule_arguments(pipeline_size, num_microbatches)
    P, m, labels = pipeline_size, num_microbatches, Routing(rank, pipeline_size, 1)
    first, last = rank == 0, rank == P - 1
    warmup = min(P - rank - 1, m)
    remaining = m - warmup
    plan = []
    for i in range(warmup):
        if not first:
            _append(plan, Communicate(recv_prev=labels.next_activation(0)))
        plan.append(Forward(0, i))
        _append(plan, Communicate(send_next=labels.output_to_next(0, i)))
    if remaining > 0 and not first:
        _append(plan, Communicate(recv_prev=labels.next_activation(0)))
    for i in range(remaining):
        forward_mb, backward_mb = warmup + i, i
        plan.append(Forward(0, forward_mb))
        # send this output and receive the gradient of the oldest in-flight micro-batch together
        _append(
            plan,
            Communicate(
                send_next=labels.output_to_next(0, forward_mb), recv_next=None if last else labels.next_gradient(0)
            ),
        )
        plan.append(Backward(0, backward_mb))
        more = i < remaining - 1
        _append(
            plan,
            Communicate(
                send_prev=labels.gradient_to_prev(0, backward_mb),
                recv_prev=labels.next_activation(0) if more and not first else None,
            ),
        )
    for backward_mb in range(remaining, m):
        if not last:
            _append(plan, Communicate(recv_next=labels.next_gradient(0)))
        plan.append(Backward(0, backward_mb))
        _append(plan, Communicate(send_prev=labels.gradient_to_prev(0, backward_mb)))
    return plan


def interleaved_unit(k, pipeline_size, num_chunks, forward):
    """(chunk, microbatch) of the k-th forward (or backward) unit on a rank: P micro-batches pass
    through chunk 0, then the same P through chunk 1, ...; backwards visit the chunks in reverse."""
    group = pipeline_size * num_chunks
    chunk = (k // pipeline_size) % num_chunks  # Python's floor division: defined for k < 0 too
    if not forward:
        chunk = num_chunks - 1 - chunk
    return chunk, (k // group) * pipeline_size + k % pipeline_size


def interleaved_warmup(rank, pipeline_size, num_microbatches, num_chunks):
    """Forward units run before the first backward on this rank (Megatron's count)."""
    total = num_microbatches * num_chunks
    if num_microbatches == pipeline_size:
        return total
    return min((pipeline_size - rank - 1) * 2 + (num_chunks - 1) * pipeline_size, total)


def interleaved_one_forward_one_backward(rank, pipeline_size, num_microbatches, num_chunks, forward_only=False):
    """Megatron's interleaved 1F1B over num_chunks model chunks per rank (m a multiple of P): the
    bubble shrinks by the factor num_chunks at the price of num_chunks times more communication.
    forward_only: the same forward order, no backwards (evaluation)."""
    check_schedule_arguments(pipeline_size, num_microbatches, num_chunks)
    P, v = pipeline_size, num_chunks
    total = num_microbatches * v
    labels = Routing(rank, P, v)
    first_rank, last_rank = rank == 0, rank == P - 1
    warmup = total if forward_only else interleaved_warmup(rank, P, num_microbatches, v)
    all_warmup = forward_only or (warmup == total and num_microbatches == P)
    remaining = total - warmup

    def fwd(k):
        return interleaved_unit(k, P, v, True)

    def bwd(k):
        return interleaved_unit(k, P, v, False)

    plan = []
    if not first_rank:
        _append(plan, Communicate(recv_prev=labels.next_activation(0)))
    for k in range(warmup):
        chunk, mb = fwd(k)
        plan.append(Forward(chunk, mb))
        next_chunk = fwd(k + 1)[0]
        recv_prev = not (first_rank and next_chunk == 0) and k != total - 1
        recv_next = k == warmup - 1 and not all_warmup and not last_rank
        _append(
            plan,
            Communicate(
                send_next=labels.output_to_next(chunk, mb),
                recv_prev=labels.next_activation(next_chunk) if recv_prev else None,
                recv_next=labels.next_gradient(v - 1) if recv_next else None,
            ),
        )
    for k in range(remaining):
        forward_k = k + warmup
        f_chunk, f_mb = fwd(forward_k)
        plan.append(Forward(f_chunk, f_mb))
        b_chunk, b_mb = bwd(k)
        plan.append(Backward(b_chunk, b_mb))
        # What arrives now: on the first rank, the activation the last rank produced P - 1 forward
        # units ago (it feeds the next chunk); elsewhere, the input of this rank's next forward.
        # Gradients mirror that on the last rank.
        recv_prev = True
        if first_rank:
            next_f_chunk = fwd(forward_k - (P - 1))[0]
            recv_prev = next_f_chunk != v - 1
            next_f_chunk += 1
        else:
            next_f_chunk = fwd(forward_k + 1)[0]
        recv_next = True
        if last_rank:
            next_b_chunk = bwd(k - (P - 1))[0]
            recv_next = next_b_chunk != 0
            next_b_chunk -= 1
        else:
            next_b_chunk = bwd(k + 1)[0]
        recv_prev = recv_prev and k != remaining - 1
        _append(
            plan,
            Communicate(
                send_next=labels.output_to_next(f_chunk, f_mb),
                send_prev=labels.gradient_to_prev(b_chunk, b_mb),
                recv_prev=labels.next_activation(next_f_chunk) if recv_prev else None,
                recv_next=labels.next_gradient(next_b_chunk) if recv_next else None,
            ),
        )
    if forward_only:
        return plan
    if all_warmup and not last_rank:
        _append(plan, Communicate(recv_next=labels.next_gradient(v - 1)))
    for k in range(remaining, total):
        chunk, mb = bwd(k)
        plan.append(Backward(chunk, mb))
        next_chunk = bwd(k + 1)[0]
        recv_next = not (last_rank and next_chunk == v - 1) and k != total - 1
        _append(
            plan,
            Communicate(
                send_prev=labels.gradient_to_prev(chunk, mb),
                recv_next=labels.next_gradient(next_chunk) if recv_next else None,
            ),
        )
    return plan


def build_plan(rank, pipeline_size, num_microbatches, num_chunks=1):
    if num_chunks == 1:
        return one_forward_one_backward(rank, pipeline_size, num_microbatches)
    return interleaved_one_forward_one_backward(rank, pipeline_size, num_microbatches, num_chunks)


def forward_only_plan(rank, pipeline_size, num_microbatches, num_chunks=1):
    """Evaluation: forwards only, in the training schedule's forward order (the executor keeps no
    activations for backward)."""
    if num_chunks > 1:
        return interleaved_one_forward_one_backward(
            rank, pipeline_size, num_microbatches, num_chunks, forward_only=True
        )
    check_schedule_arguments(pipeline_size, num_microbatches)
    labels = Routing(rank, pipeline_size, 1)
    plan = []
    for mb in range(num_microbatches):
        if rank > 0:
            plan.append(Communicate(recv_prev=labels.next_activation(0)))
        plan.append(Forward(0, mb))
        _append(plan, Communicate(send_next=labels.output_to_next(0, mb)))
    return plan


def max_live_activations(plan):
    """Most (chunk, micro-batch) activations held at once: a forward stores one, its backward frees it."""
    live = peak = 0
    for step in plan:
        if isinstance(step, Forward):
            live += 1
            peak = max(peak, live)
        elif isinstance(step, Backward):
            live -= 1
    return peak

"""Point-to-point transfers of activations and their gradients between neighbouring pipeline stages.

Every tensor that crosses a stage boundary has the same shape, known before the step starts:
[micro_batch, seq, hidden] ([micro_batch, seq / TP, hidden] under sequence parallelism, which sends
only this rank's sequence shard) in the model's dtype. So receives are allocated from that shape and
no shapes are exchanged at run time.

All transfers that a schedule step needs (to the next stage, to the previous one, from either) are
posted as one batch (torch.distributed.batch_isend_irecv) and waited for together: a rank never
blocks on one send while its neighbour blocks on another. Within a batch, sends to the next rank are
posted before sends to the previous rank and receives from the previous rank before receives from
the next: with two stages (whose next and previous rank are the same process) the k-th send of one
side then meets the k-th receive of the other even on backends that ignore tags (NCCL); on gloo the
tags separate activations from gradients as well.
"""

import torch
import torch.distributed as dist

from megaphi.parallel import state

ACTIVATION_TAG, GRADIENT_TAG = 1, 2


class StageCommunicator:
    """Sends and receives of one pipeline rank. shape/dtype/device describe every boundary tensor."""

    def __init__(self, shape, dtype, device=None, group=None, next_rank=None, prev_rank=None):
        self.shape, self.dtype = tuple(shape), dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.group = state.get_pipeline_model_parallel_group() if group is None else group
        self.next_rank = state.get_pipeline_model_parallel_next_rank() if next_rank is None else next_rank
        self.prev_rank = state.get_pipeline_model_parallel_prev_rank() if prev_rank is None else prev_rank

    def _empty(self):
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def _check(self, tensor, what):
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ValueError(
                f"pipeline {what}: shape {tuple(tensor.shape)} {tensor.dtype} differs from the "
                f"boundary shape {self.shape} {self.dtype} fixed for the run (micro-batch size, "
                f"sequence length and hidden size must not change within a step)"
            )
        return tensor.contiguous()

    def communicate(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        """Post one batch of transfers and wait for all of them. send_next: an activation for the next
        stage; send_prev: an input gradient for the previous stage. Returns (from_prev, from_next):
        the received activation and output gradient (None where not asked for)."""
        ops, from_prev, from_next = [], None, None
        if send_next is not None:
            ops.append(
                dist.P2POp(
                    dist.isend,
                    self._check(send_next, "activation"),
                    self.next_rank,
                    group=self.group,
                    tag=ACTIVATION_TAG,
                )
            )
        if send_prev is not None:
            ops.append(
                dist.P2POp(
                    dist.isend, self._check(send_prev, "gradient"), self.prev_rank, group=self.group, tag=GRADIENT_TAG
                )
            )
        if recv_prev:
            from_prev = self._empty()
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev_rank, group=self.group, tag=ACTIVATION_TAG))
        if recv_next:
            from_next = self._empty()
            ops.append(dist.P2POp(dist.irecv, from_next, self.next_rank, group=self.group, tag=GRADIENT_TAG))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return from_prev, from_next

    # Megatron's named transfers, for callers that want one direction at a time.
    def recv_forward(self):
        return self.communicate(recv_prev=True)[0]

    def send_forward(self, activation):
        self.communicate(send_next=activation)

    def recv_backward(self):
        return self.communicate(recv_next=True)[1]

    def send_backward(self, gradient):
        self.communicate(send_prev=gradient)

    def send_forward_recv_backward(self, activation):
        return self.communicate(send_next=activation, recv_next=True)[1]

    def send_backward_recv_forward(self, gradient):
        return self.communicate(send_prev=gradient, recv_prev=True)[0]


def boundary_shape(micro_batch_size, seq_length, hidden_size, sequence_parallel=False, tp_size=None):
    """Shape of the tensors exchanged between stages: the model's [batch, seq, hidden], or under
    sequence parallel this rank's sequence-first chunk [seq/TP, batch, hidden]."""
    tp = state.get_tensor_model_parallel_world_size() if tp_size is None else tp_size
    if sequence_parallel and tp > 1:
        if seq_length % tp:
            raise ValueError(
                f"sequence parallel: sequence length {seq_length} is not divisible by --tensor-model-parallel-size {tp}"
            )
        return (seq_length // tp, micro_batch_size, hidden_size)
    return (micro_batch_size, seq_length, hidden_size)

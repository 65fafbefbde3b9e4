"""Cross entropy over vocab-sharded logits, in fp32, without gathering the full vocabulary.

Each rank holds logits[..., V/TP] for its vocab range; only [tokens]-sized tensors (max, target
logit, sum of exps) are all-reduced. Returns per-token losses (fp32, shape of labels).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .state import get_tensor_model_parallel_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from .utils import vocab_range


def _at_least_fp32(x):
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _all_reduce(x, op):
    if get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=get_tensor_model_parallel_group())
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_shard, labels):
        logits = _at_least_fp32(logits_shard)
        max_logit = logits.max(dim=-1)[0]
        _all_reduce(max_logit, dist.ReduceOp.MAX)
        logits = logits - max_logit.unsqueeze(-1)

        partition = logits.shape[-1]
        start, end = vocab_range(partition * get_tensor_model_parallel_world_size(),
                                 get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
        outside = (labels < start) | (labels >= end)
        local_labels = (labels - start).masked_fill(outside, 0)
        target_logit = logits.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        _all_reduce(target_logit, dist.ReduceOp.SUM)

        exp_logits = logits.exp_()  # a fresh tensor (logits - max): reuse its memory
        sum_exp = exp_logits.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM)
        loss = torch.log(sum_exp) - target_logit

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.input_dtype = logits_shard.dtype
        ctx.save_for_backward(softmax, local_labels, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_labels, outside = ctx.saved_tensors
        grad = softmax.clone()
        # d loss / d logit = softmax - onehot(target); the onehot lives on the rank owning the target.
        grad.scatter_add_(-1, local_labels.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None


def vocab_parallel_cross_entropy(logits_shard, labels):
    """Per-token cross entropy in fp32 (float64 stays float64); logits_shard [..., V/TP] (this rank's vocab range), labels [...].

    Labels must be valid ids in [0, V); mask unwanted positions with a loss mask afterwards.
    At TP=1 this is F.cross_entropy on fp32 logits.
    """
    if get_tensor_model_parallel_world_size() == 1:
        vocab = logits_shard.shape[-1]
        return F.cross_entropy(_at_least_fp32(logits_shard).reshape(-1, vocab), labels.reshape(-1),
                               reduction="none").view(labels.shape)
    return _VocabParallelCrossEntropy.apply(logits_shard, labels)

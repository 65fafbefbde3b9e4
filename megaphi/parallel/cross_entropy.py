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
        if logits is logits_shard:  # the caller's fp32 tensor: leave it alone
            logits = logits - max_logit.unsqueeze(-1)
        else:  # our own fp32 copy: shift it in place (no second [tokens, V/TP] buffer), as Megatron does
            logits.sub_(max_logit.unsqueeze(-1))

        partition = logits.shape[-1]
        start, end = vocab_range(
            partition * get_tensor_model_parallel_world_size(),
            get_tensor_model_parallel_rank(),
            get_tensor_model_parallel_world_size(),
        )
        outside = (labels < start) | (labels >= end)
        local_labels = (labels - start).masked_fill(outside, 0)
        target_logit = logits.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        _all_reduce(target_logit, dist.ReduceOp.SUM)

        exp_logits = logits.exp_()  # a tensor of ours (the shifted copy): reuse its memory
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
        grad = softmax  # turned into the gradient in place: the backward runs once (no retain_graph)
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
        return F.cross_entropy(
            _at_least_fp32(logits_shard).reshape(-1, vocab), labels.reshape(-1), reduction="none"
        ).view(labels.shape)
    return _VocabParallelCrossEntropy.apply(logits_shard, labels)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of (hidden @ weight^T + bias) over this rank's vocab shard, computed
    chunk_tokens tokens at a time: no [tokens, vocab] logits (nor their fp32 copy or saved softmax)
    outlive one chunk. Forward keeps only each token's log-sum-exp; backward recomputes each chunk's
    logits (one extra lm_head matmul, ~2.5% of a phi-1 step) and turns them into gradients at once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens):
        tokens = hidden.shape[0]
        start, end = _shard_range(weight.shape[0])
        losses = torch.empty(tokens, dtype=_loss_dtype(hidden), device=hidden.device)
        lse = torch.empty_like(losses)
        for lo in range(0, tokens, chunk_tokens):
            hi = min(lo + chunk_tokens, tokens)
            logits = _at_least_fp32(F.linear(hidden[lo:hi], weight, bias))
            max_logit = logits.max(dim=-1)[0]
            _all_reduce(max_logit, dist.ReduceOp.MAX)
            logits = logits - max_logit.unsqueeze(-1)
            target = _target_logit(logits, labels[lo:hi], start, end)
            sum_exp = logits.exp_().sum(dim=-1)
            _all_reduce(sum_exp, dist.ReduceOp.SUM)
            log_sum_exp = torch.log(sum_exp)
            losses[lo:hi] = log_sum_exp - target
            lse[lo:hi] = log_sum_exp + max_logit
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), labels, lse)
        ctx.has_bias, ctx.chunk_tokens = bias is not None, chunk_tokens
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        start, end = _shard_range(weight.shape[0])
        grad_hidden = torch.empty_like(hidden)
        # weight/bias gradients summed over chunks in fp32 (float64 stays float64), cast once at the end
        acc_dtype = _loss_dtype(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        grad_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if ctx.has_bias else None
        for lo in range(0, hidden.shape[0], ctx.chunk_tokens):
            hi = min(lo + ctx.chunk_tokens, hidden.shape[0])
            h = hidden[lo:hi]
            # softmax - onehot(target), scaled by the incoming per-token gradient
            grad_logits = _at_least_fp32(F.linear(h, weight, bias)).sub_(lse[lo:hi].unsqueeze(-1)).exp_()
            # subtract 1 at each owned target with fixed shapes: a boolean-mask index would run a
            # nonzero (a host sync per chunk on a GPU). Tokens whose target another rank owns add
            # -0.0 to column 0, which leaves every value's bits unchanged.
            local = labels[lo:hi] - start
            owned = (local >= 0) & (local < end - start)
            grad_logits.scatter_add_(
                -1, local.masked_fill(~owned, 0).unsqueeze(-1), owned.to(grad_logits.dtype).neg_().unsqueeze(-1)
            )
            grad_logits.mul_(grad_losses[lo:hi].unsqueeze(-1))
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[lo:hi] = grad_logits @ weight
            grad_weight += (grad_logits.t() @ h).to(acc_dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0, dtype=acc_dtype)
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None


def _loss_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _shard_range(partition):
    return vocab_range(
        partition * get_tensor_model_parallel_world_size(),
        get_tensor_model_parallel_rank(),
        get_tensor_model_parallel_world_size(),
    )


def _target_logit(logits, labels, start, end):
    """Each token's (max-shifted) target logit, summed over the TP ranks (only the owner's is nonzero)."""
    outside = (labels < start) | (labels >= end)
    local = (labels - start).masked_fill(outside, 0)
    target = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    return _all_reduce(target, dist.ReduceOp.SUM)


def chunked_linear_cross_entropy(hidden, weight, bias, labels, chunk_tokens):
    """Per-token cross entropy (fp32; float64 stays float64) of the logits hidden @ weight^T + bias,
    without materializing them: hidden [..., h] (already in the TP region), weight [V/TP, h] (this
    rank's vocab shard), labels [...] valid ids in [0, V). Equals vocab_parallel_cross_entropy on the
    full logits, in value and gradients, up to the matmuls' rounding of each chunk."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    losses = _ChunkedLinearCrossEntropy.apply(flat_hidden, weight, bias, labels.reshape(-1), int(chunk_tokens))
    return losses.view(labels.shape)

"""The chunked vocab-parallel cross entropy's backward has no data-dependent shapes.

Boolean-mask indexing (x[rows[mask], cols[mask]]) runs a nonzero to size its result: on a GPU that is
a host synchronization per chunk. The backward must turn softmax into softmax - onehot(target) with
fixed-shape ops only, and give the same bits as the masked subtraction it replaces. A TP rank is
emulated in one process (this rank's vocab range, the cross-rank sums an identity) so that targets
outside the shard occur; the all-reduce only adds the other ranks' terms and does not change what this
rank computes.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import megaphi.parallel.cross_entropy as ce

# ops whose output shape depends on tensor values, or that boolean indexing lowers to
DATA_DEPENDENT = {
    "nonzero",
    "index",
    "index_put",
    "index_put_",
    "masked_select",
    "masked_scatter",
    "_index_put_impl_",
    "argwhere",
    "unique",
    "_unique2",
    "nonzero_static",
}


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tp_rank(monkeypatch):
    """Pretend to be TP rank `rank` of `world` (vocab shard [rank*V/world, (rank+1)*V/world))."""

    def set_rank(rank, world):
        monkeypatch.setattr(ce, "get_tensor_model_parallel_world_size", lambda: world)
        monkeypatch.setattr(ce, "get_tensor_model_parallel_rank", lambda: rank)
        monkeypatch.setattr(ce, "_all_reduce", lambda x, op: x)

    return set_rank


def _inputs(dtype, tokens=37, hidden=16, shard=24, vocab=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(shard, hidden, generator=g)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(shard, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    grad_losses = torch.rand(tokens, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return h, w, b, labels, grad_losses


def _masked_reference_backward(h, w, b, labels, grad_losses, lse, start, end, chunk):
    """The gradients as the masked subtraction computes them (the formula the fixed-shape code replaces)."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(w.shape, dtype=acc)
    grad_b = torch.zeros(w.shape[0], dtype=acc)
    for lo in range(0, h.shape[0], chunk):
        hi = min(lo + chunk, h.shape[0])
        logits = torch.nn.functional.linear(h[lo:hi], w, b)
        logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        g = logits.sub_(lse[lo:hi].unsqueeze(-1)).exp_()
        local = labels[lo:hi] - start
        owned = (local >= 0) & (local < end - start)
        rows = torch.arange(hi - lo)
        g[rows[owned], local[owned]] -= 1.0
        g.mul_(grad_losses[lo:hi].unsqueeze(-1))
        g = g.to(h.dtype)
        grad_h[lo:hi] = g @ w
        grad_w += (g.t() @ h[lo:hi]).to(acc)
        grad_b += g.sum(dim=0, dtype=acc)
    return grad_h, grad_w.to(w.dtype), grad_b.to(b.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rank", [0, 1])
def test_backward_is_bitwise_the_masked_subtraction(tp_rank, dtype, rank):
    tp_rank(rank, 2)
    h, w, b, labels, grad_losses = _inputs(dtype)
    chunk = 8
    losses = ce.chunked_linear_cross_entropy(h, w, b, labels, chunk)
    with torch.no_grad():  # this rank's log-sum-exp, as the forward keeps it
        logits = torch.nn.functional.linear(h, w, b).to(losses.dtype)
        lse = torch.logsumexp(logits, dim=-1)
    start, end = rank * 24, (rank + 1) * 24
    owned = ((labels >= start) & (labels < end)).sum().item()
    assert 0 < owned < labels.numel()  # both kinds of targets occur on this rank
    losses.backward(grad_losses)
    want_h, want_w, want_b = _masked_reference_backward(
        h.detach(), w.detach(), b.detach(), labels, grad_losses, lse, start, end, chunk
    )
    assert torch.equal(h.grad, want_h)
    assert torch.equal(w.grad, want_w)
    assert torch.equal(b.grad, want_b)


def test_backward_runs_no_data_dependent_op(tp_rank):
    tp_rank(1, 2)
    h, w, b, labels, grad_losses = _inputs(torch.float32)
    losses = ce.chunked_linear_cross_entropy(h, w, b, labels, 8)
    with OpRecorder() as recorder:
        losses.backward(grad_losses)
    assert "mm" in recorder.ops or "addmm" in recorder.ops  # the recorder sees the backward's ops
    assert not DATA_DEPENDENT & set(recorder.ops), sorted(DATA_DEPENDENT & set(recorder.ops))


def test_forward_and_unchunked_path_run_no_data_dependent_op(tp_rank):
    tp_rank(0, 2)
    h, w, b, labels, grad_losses = _inputs(torch.float32)
    with OpRecorder() as recorder:
        losses = ce.chunked_linear_cross_entropy(h, w, b, labels, 8)
        logits = torch.nn.functional.linear(h, w, b)
        ce.vocab_parallel_cross_entropy(logits, labels).backward(grad_losses)
    assert losses.shape == labels.shape
    assert not DATA_DEPENDENT & set(recorder.ops), sorted(DATA_DEPENDENT & set(recorder.ops))

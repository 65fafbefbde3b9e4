"""Memory switches equal the default path: chunked lm_head + cross entropy (no full logits), selective
(core attention) recompute and recompute of the first N layers.

The switches are ModelRuntime choices (megaphi.model.runtime). References are the plain runtime
(unchunked, no recompute) on the same weights and batch: torch's
F.cross_entropy over full logits at TP=1, so the chunked loss is checked against independent code.
Float64 comparisons are exact up to summation order (1e-12); recompute replays the same ops with the
same RNG states, so it is compared bit for bit.
"""

import pytest
import torch

from dist_utils import run_distributed
from megaphi.config import PhiConfig
from megaphi.model.runtime import ModelRuntime

CONFIG = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    rotary_dim=4,
    max_position_embeddings=32,
)


def _batch():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 17), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100
    return ids[:, :-1], labels


def _losses_and_grads(dtype=torch.float64, dropout=0.0, seed=None, **switches):
    from megaphi.model import PhiForCausalLM

    config = PhiConfig(**CONFIG, attention_dropout=dropout, resid_dropout=dropout, embd_dropout=0.0)
    model = PhiForCausalLM(config, init_seed=9, runtime=ModelRuntime(**switches)).to(dtype).train()
    ids, labels = _batch()
    if seed is not None:
        from megaphi.parallel.random import model_parallel_seed

        model_parallel_seed(seed)
    token_losses, _ = model(ids, labels=labels, reduction="none")
    token_losses.sum().backward()
    return token_losses.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _reference_loss(dtype=torch.float64):
    """F.cross_entropy (ignore_index) over the default model's full logits."""
    from megaphi.model import PhiForCausalLM

    model = PhiForCausalLM(
        PhiConfig(**CONFIG, attention_dropout=0.0, resid_dropout=0.0, embd_dropout=0.0), init_seed=9
    ).to(dtype)
    ids, labels = _batch()
    logits = model(ids)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)


@pytest.mark.parametrize("chunk", [1, 5, 32, 10_000])
def test_chunked_loss_equals_full_logits_in_float64(chunk):
    losses, grads = _losses_and_grads(loss_chunk_tokens=chunk)
    ref_losses, ref_grads = _losses_and_grads()
    torch.testing.assert_close(losses, _reference_loss().detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-12)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-12, msg=name)


def test_chunked_loss_in_float32_within_rounding():
    """fp32: each chunk's matmul may round differently; bounded by a few ulps of O(1) values."""
    losses, grads = _losses_and_grads(torch.float32, loss_chunk_tokens=7)
    ref_losses, ref_grads = _losses_and_grads(torch.float32)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "switches",
    [dict(recompute="selective"), dict(recompute="full", recompute_num_layers=1), dict(recompute="full")],
    ids=["selective", "first-layer", "full"],
)
def test_recompute_is_rng_exact_with_dropout(switches):
    losses, grads = _losses_and_grads(dropout=0.3, seed=5, **switches)
    ref_losses, ref_grads = _losses_and_grads(dropout=0.3, seed=5)
    assert torch.equal(losses, ref_losses)
    assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())
    # and the dropout is live: another seed gives other losses
    other, _ = _losses_and_grads(dropout=0.3, seed=6, **switches)
    assert not torch.equal(other, losses)


def _tp_worker(rank, world, sequence_parallel, expected, out_path):
    from megaphi.model import PhiForCausalLM
    from megaphi.parallel import state
    from megaphi.parallel.mappings import gather_shards

    state.initialize_model_parallel(world)
    config = PhiConfig(**CONFIG, attention_dropout=0.0, resid_dropout=0.0, embd_dropout=0.0)
    runtime = ModelRuntime(loss_chunk_tokens=6, sequence_parallel=sequence_parallel)
    model = PhiForCausalLM(config, init_seed=9, runtime=runtime).double().train()
    ids, labels = _batch()
    losses, _ = model(ids, labels=labels, reduction="none")
    losses.sum().backward()
    ref_losses, ref_grads = expected
    torch.testing.assert_close(losses.detach(), ref_losses, rtol=0, atol=1e-12)
    for name, p in model.named_parameters():
        grad = gather_shards(p.grad, p.partition_dim) if p.tensor_model_parallel else p.grad
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-12, msg=name)
    state.destroy_model_parallel()


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
@pytest.mark.distributed
def test_chunked_vocab_parallel_loss_equals_tp1(sequence_parallel, tmp_path):
    run_distributed(_tp_worker, 2, sequence_parallel, _losses_and_grads(), str(tmp_path / "unused"))


def test_switch_validation():
    with pytest.raises(ValueError, match="recompute must be one of none, selective, full"):
        ModelRuntime(recompute="half")
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        ModelRuntime(loss_chunk_tokens=-1)
    with pytest.raises(ValueError, match="recompute_num_layers"):
        ModelRuntime(recompute="full", recompute_num_layers=True)
    with pytest.raises(TypeError):
        PhiConfig(**CONFIG, recompute=True)  # not an architecture field any more


@pytest.mark.parametrize(
    "switches, calls",
    [
        (dict(), 2),
        (dict(recompute="selective"), 4),
        (dict(recompute="full", recompute_num_layers=1), 3),
        (dict(recompute="full"), 4),
    ],
    ids=["none", "selective", "first-layer", "full"],
)
def test_recompute_replays_what_it_says(monkeypatch, switches, calls):
    """The attention core runs once per layer in the forward, and once more in the backward for every
    layer whose attention is recomputed (2 layers here)."""
    import megaphi.model.phi as phi

    seen = []
    original = phi.causal_attention
    monkeypatch.setattr(phi, "causal_attention", lambda *a, **k: seen.append(1) or original(*a, **k))
    _losses_and_grads(**switches)
    assert len(seen) == calls


@pytest.mark.parametrize("backend", ["math", "sdpa-flash"])
def test_forced_sdpa_backends_equal_auto_on_cpu(backend):
    """CPU has SDPA's math and flash kernels: forcing either gives auto's result (float64 math is the
    reference), forward and backward."""
    losses, grads = _losses_and_grads(torch.float32, attention_backend=backend)
    ref_losses, ref_grads = _losses_and_grads(torch.float32)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_unavailable_attention_backend_is_a_clear_error_at_start():
    from megaphi.model.attention import causal_attention
    from megaphi.training.arguments import ArgumentError
    from megaphi.training.run_info import attention_backend

    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="flash-attn"):
        causal_attention(q, q, q, backend="flash-attn")
    config = PhiConfig(**CONFIG)
    with pytest.raises(ArgumentError, match="--attention-backend sdpa-efficient cannot run here"):
        attention_backend(torch.device("cpu"), torch.float32, config, 16, forced="sdpa-efficient")
    assert (
        attention_backend(torch.device("cpu"), torch.float32, config, 16, forced="math") == "math (--attention-backend)"
    )
    with pytest.raises(ValueError, match="attention_backend"):
        ModelRuntime(attention_backend="xformers")


def _held_bytes_per_layer(granularity, backend, dropout):
    """benchmarks/recompute_memory.py's deterministic count (bytes of distinct storages autograd or a
    checkpoint keeps for the backward, parameters excluded) for one decoder layer."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "recompute_memory.py"
    spec = importlib.util.spec_from_file_location("recompute_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(
        hidden=128, layers=2, seq=_S, batch=_B, vocab=96, dropout=dropout, dtype="float32", backend=backend
    )
    return module.per_layer(args, granularity, module.measure(granularity, args))


# b, s, heads at hidden 128: the s x s probabilities are b*heads*s*s fp32, the logsumexp b*heads*s
_B, _S, _HEADS = 2, 256, 2
_BSH = _B * _S * 128 * 4


@pytest.mark.parametrize("backend, dropout", [("math", 0.0), ("auto", 0.1)], ids=["math", "dropout"])
def test_selective_recompute_drops_the_attention_probabilities(backend, dropout):
    """Where the attention kernel keeps the s x s probabilities (SDPA's math kernel; on CPU also
    whenever dropout is on), selective recompute frees them but keeps the rotated q and k to recompute
    from (the math kernel keeps scaled copies of them instead), and full recompute frees more."""
    none, selective, full = (_held_bytes_per_layer(g, backend, dropout) for g in ("none", "selective", "full"))
    probabilities = _B * _HEADS * _S * _S * 4  # 4 x _BSH here
    assert none - selective >= probabilities - 2 * _BSH
    assert full < selective


def test_selective_recompute_saves_almost_nothing_with_a_flash_kernel():
    """A flash kernel (here SDPA's CPU flash kernel, no dropout) keeps q, k, v, its output and the
    logsumexp; q, k, v stay for the recompute and the output is the dense layer's input anyway, so
    selective frees only the logsumexp."""
    none, selective = (_held_bytes_per_layer(g, "sdpa-flash", 0.0) for g in ("none", "selective"))
    assert 0 <= none - selective <= _B * _HEADS * _S * 4

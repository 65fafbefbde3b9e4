"""Numerical parity with Hugging Face transformers' PhiForCausalLM (the independent reference)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megaphi.config import PhiConfig  # noqa: E402
from megaphi.model import PhiForCausalLM  # noqa: E402
from megaphi.checkpoint.hf_names import model_to_hf_names  # noqa: E402

# (vocab, hidden, ffn, layers, heads, rotary_dim): head dim 64 with rotary 32 like phi-1; a deeper one.
CONFIGS = {"head64_rot32": (512, 128, 512, 2, 2, 32), "four_layers": (384, 96, 256, 4, 3, 16)}


def build_pair(name, dtype, seed=0):
    vocab, hidden, ffn, layers, heads, rot = CONFIGS[name]
    hf_config = transformers.PhiConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        partial_rotary_factor=rot / (hidden // heads),
        max_position_embeddings=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        layer_norm_eps=1e-5,
    )
    # fp32: the textbook eager path (explicit mask + softmax). float64: eager rounds its softmax to
    # fp32, so use HF's SDPA path there.
    hf_config._attn_implementation = "eager" if dtype == torch.float32 else "sdpa"
    torch.manual_seed(seed)
    hf = transformers.PhiForCausalLM(hf_config).to(dtype).eval()
    with torch.no_grad():  # HF zeroes biases and sets LN to ones: randomize all so every tensor matters
        for p in hf.parameters():
            p.normal_(0.0, 0.05)
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5 + (1.0 if p.shape[0] == hidden else 0.0))
    ours_config = PhiConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        rotary_dim=rot,
        max_position_embeddings=128,
        attention_dropout=0.0,
        resid_dropout=0.0,
        embd_dropout=0.0,
    )
    ours = PhiForCausalLM(ours_config, initialize=False, dtype=dtype).eval()
    ours.load_hf_state_dict(hf.state_dict())
    return hf, ours


def inputs(vocab, batch=2, seq=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_logits_loss_and_grads_match_transformers(name, dtype, tol):
    hf, ours = build_pair(name, dtype)
    ids = inputs(CONFIGS[name][0])
    hf_out = hf(ids, labels=ids)
    # HF's loss casts logits to fp32 even in a float64 model: take torch's CE on its logits instead.
    ref_loss = torch.nn.functional.cross_entropy(
        hf_out.logits[:, :-1].reshape(-1, hf_out.logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    if dtype == torch.float32:
        assert abs(ref_loss.item() - hf_out.loss.item()) <= tol
    # HF shifts labels internally; megaphi takes aligned labels (Megatron style) with -100 ignored.
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    loss, logits = ours(ids, labels=labels)
    assert logits.dtype == dtype and logits.shape == hf_out.logits.shape
    assert max_diff(logits, hf_out.logits) <= tol
    assert loss.dtype == dtype and abs(loss.item() - ref_loss.item()) <= tol

    ref_loss.backward()
    loss.backward()
    our_grads = model_to_hf_names({n: p.grad for n, p in ours.named_parameters()}, ours.config)
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    assert set(our_grads) == set(hf_grads)
    for n, g in hf_grads.items():
        assert max_diff(our_grads[n], g) <= tol, n


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_back_to_transformers(name):
    hf, ours = build_pair(name, torch.float32)
    exported = ours.hf_state_dict()
    reference = hf.state_dict()
    assert set(exported) == set(reference)
    for n, t in reference.items():
        assert torch.equal(exported[n], t), n  # bit-identical round trip through the fused layout
    fresh = transformers.PhiForCausalLM(hf.config).eval()
    fresh.load_state_dict(exported)
    ids = inputs(CONFIGS[name][0], seed=3)
    with torch.no_grad():
        assert max_diff(fresh(ids).logits, ours(ids)) <= 1e-5


def test_sdpa_path_matches_transformers_sdpa():
    hf, ours = build_pair("head64_rot32", torch.float32)
    hf.config._attn_implementation = "sdpa"
    ids = inputs(512, seq=40)
    with torch.no_grad():
        assert max_diff(hf(ids).logits, ours(ids)) <= 1e-5

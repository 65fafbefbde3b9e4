"""Model behaviour: init, dropout/RNG, recompute, KV cache, save/load."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from megaphi.config import get_preset
from megaphi.model import ModelRuntime, PhiForCausalLM
from megaphi.parallel.random import model_parallel_seed

CONFIG = get_preset("tiny", vocab_size=256, num_hidden_layers=2, max_position_embeddings=64)


def ids(batch=2, seq=16, seed=0):
    return torch.randint(0, CONFIG.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_init_statistics_and_determinism():
    big = PhiForCausalLM(get_preset("tiny", hidden_size=256, intermediate_size=1024, num_hidden_layers=4), init_seed=3)
    out_std = 0.02 / math.sqrt(2 * 4)
    for name, p in big.named_parameters():
        if name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "layernorm" in name:
            assert torch.all(p == 1), name
        else:
            expected = out_std if name.endswith(("dense.weight", "fc2.weight")) else 0.02
            assert abs(p.std().item() - expected) < 0.1 * expected, name
            assert abs(p.mean().item()) < 0.1 * expected, name
    a, b, c = (PhiForCausalLM(CONFIG, init_seed=s) for s in (1, 1, 2))
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), n
    torch.manual_seed(1)  # default seed: torch.initial_seed()
    d = PhiForCausalLM(CONFIG)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), d.parameters()))


def test_eval_is_deterministic_and_dropout_masks_follow_the_seed():
    model = PhiForCausalLM(CONFIG, init_seed=0)
    x = ids()
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        e1 = model(x)
        torch.manual_seed(2)
        assert torch.equal(e1, model(x))
    model.train()

    def train_logits(seed):
        model_parallel_seed(seed)
        with torch.no_grad():
            return model(x)

    t1, t1_again, t2 = train_logits(5), train_logits(5), train_logits(6)
    assert torch.equal(t1, t1_again)
    assert not torch.allclose(t1, t2)
    assert not torch.allclose(t1, e1)
    # attention-probability dropout alone also follows the seed (it draws from the TP stream)
    attn_only = PhiForCausalLM(CONFIG.replace(resid_dropout=0.0), init_seed=0).train()
    model_parallel_seed(5)
    with torch.no_grad():
        a1 = attn_only(x)
    model_parallel_seed(5)
    with torch.no_grad():
        assert torch.equal(a1, attn_only(x))
    assert not torch.allclose(a1, e1)


def test_recompute_gives_identical_loss_and_grads_with_dropout():
    x, labels = ids(), ids(seed=1)
    results = []
    for recompute in ("none", "full"):
        model = PhiForCausalLM(
            CONFIG.replace(embd_dropout=0.1), init_seed=0, runtime=ModelRuntime(recompute=recompute)
        ).train()
        model_parallel_seed(42)
        loss, _ = model(x, labels=labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=1e-6, msg=n)


def test_loss_mask_and_reduction_none():
    model = PhiForCausalLM(CONFIG, init_seed=0).eval()
    x, labels = ids(), ids(seed=1)
    mask = torch.zeros(2, 16)
    mask[:, :5] = 1
    with torch.no_grad():
        logits = model(x)
        ref = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, CONFIG.vocab_size), labels.reshape(-1), reduction="none"
        ).view(2, 16)
        loss, out_logits = model(x, labels=labels, loss_mask=mask)
        token_losses, none = model(x, labels=labels, reduction="none")
    assert none is None and token_losses.dtype == torch.float32 and token_losses.shape == (2, 16)
    torch.testing.assert_close(token_losses, ref)
    torch.testing.assert_close(loss, ref[:, :5].mean())
    assert torch.equal(out_logits, logits)


def test_kv_cache_decoding_matches_full_forward():
    model = PhiForCausalLM(CONFIG, init_seed=0).eval()
    x = ids(seq=20)
    with torch.no_grad():
        full = model(x)
        cache = model.allocate_kv_cache(batch_size=2, max_length=32)
        steps = [model(x[:, :6], kv_cache=cache)]  # prefill into an empty cache
        steps.append(model(x[:, 6:9], kv_cache=cache))  # several tokens after cached ones (offset mask)
        for t in range(9, 20):  # one token at a time
            steps.append(model(x[:, t : t + 1], kv_cache=cache))
        assert cache.length == 20
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
        # explicit position ids give the same result
        cache.reset()
        model(x[:, :19], kv_cache=cache)
        last = model(x[:, 19:], kv_cache=cache, position_ids=torch.tensor([19]))
        torch.testing.assert_close(last, full[:, 19:], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="KV cache overflow"):
            model(ids(seq=20), kv_cache=cache)


def test_save_and_load_pretrained(tmp_path):
    model = PhiForCausalLM(CONFIG, init_seed=0).eval()
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())  # an HF config + megaphi's own keys
    assert saved["model_type"] == "phi" and {k: saved[k] for k in ("hidden_size", "rotary_dim")} == {
        "hidden_size": CONFIG.hidden_size,
        "rotary_dim": CONFIG.rotary_dim,
    }
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in tensors and "lm_head.bias" in tensors
    loaded = PhiForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    bf16 = PhiForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    tensors["model.layers.1.mlp.fc1.weight"] = tensors["model.layers.1.mlp.fc1.weight"][:, :-1].contiguous()
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.fc1\.weight' has shape"):
        PhiForCausalLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="neither a model folder"):
        PhiForCausalLM.from_pretrained(tmp_path)


def test_logits_to_keep_computes_only_the_last_positions():
    model = PhiForCausalLM(CONFIG, init_seed=0).eval()
    x, labels = ids(seq=12), ids(seq=12, seed=1)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        full = model(x)
        last3 = model(x, logits_to_keep=3)
        assert seen == [12, 3]  # lm_head only saw the kept positions
        torch.testing.assert_close(last3, full[:, -3:], rtol=0, atol=1e-6)
        assert torch.equal(model(x, logits_to_keep=0), full)  # 0 = all (the default)
        loss_all, _ = model(x, labels=labels)
        loss_kept, kept = model(x, labels=labels, logits_to_keep=1)
        assert torch.equal(loss_all, loss_kept) and kept.shape == (2, 1, CONFIG.vocab_size)  # loss uses every position
        cache = model.allocate_kv_cache(batch_size=2, max_length=16)
        prefill = model(x[:, :10], kv_cache=cache, logits_to_keep=1)
        step = model(x[:, 10:11], kv_cache=cache, logits_to_keep=1)
        torch.testing.assert_close(torch.cat([prefill, step], 1), full[:, 9:11], rtol=0, atol=1e-5)
    hook.remove()
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(x, logits_to_keep=-1)

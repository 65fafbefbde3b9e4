"""Generation: KV-cache decoding == full recomputation, == transformers' generate, sampling and stops."""

import pytest
import torch

from megaphi.config import get_preset
from megaphi.generation import GenerationConfig, generate, generate_tokens, sample_next_token, truncate_at_stop
from megaphi.model import PhiForCausalLM

PROMPTS = [[11, 22, 33, 44, 55], [7, 8, 9], [100, 200, 300, 400, 500], [1], [42, 43, 44]]


def tiny_model(vocab_size=512, dtype=torch.float64, seed=3):
    # A wider init than training's makes logits decisive, so greedy never rests on a rounding tie.
    config = get_preset("tiny", vocab_size=vocab_size, attention_dropout=0.0, resid_dropout=0.0, initializer_range=0.3)
    return PhiForCausalLM(config, init_seed=seed, dtype=dtype)


def recompute_greedy(model, prompt, steps):
    # Independent of megaphi.generation: argmax of a full forward over the whole sequence each step.
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_kv_cache_greedy_equals_full_recomputation():
    model = tiny_model()
    steps = 24
    config = GenerationConfig(max_new_tokens=steps, greedy=True, batch_size=4)
    with_cache = generate_tokens(model, PROMPTS, config)
    without_cache = generate_tokens(model, PROMPTS, GenerationConfig(max_new_tokens=steps, use_kv_cache=False))
    expected = [recompute_greedy(model, p, steps) for p in PROMPTS]
    assert with_cache == expected
    assert without_cache == expected
    # Batched (two rows of length 5, two of 3) equals one prompt at a time.
    assert [generate_tokens(model, [p], config)[0] for p in PROMPTS] == expected


def _hf_model(megaphi_config, dtype):
    transformers = pytest.importorskip("transformers")
    c = megaphi_config
    hf_config = transformers.PhiConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads,
        partial_rotary_factor=c.rotary_dim / c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        layer_norm_eps=c.layer_norm_eps,
        rope_theta=c.rope_theta,
        hidden_act="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    hf = transformers.PhiForCausalLM(hf_config).to(dtype).eval()
    with torch.no_grad():  # HF's init has tiny weights and zero biases: make every tensor matter
        for p in hf.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.1)
    return hf


def test_matches_transformers_generate_greedy_via_converted_checkpoint(tmp_path):
    from megaphi.checkpoint.model_folder import save_megaphi_folder

    config = tiny_model().config
    hf = _hf_model(config, torch.float64)
    # Convert: HF state dict (HF names) -> a megaphi checkpoint folder -> from_pretrained.
    save_megaphi_folder(str(tmp_path / "ckpt"), config, {k: v.contiguous() for k, v in hf.state_dict().items()})
    model = PhiForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float64)
    steps = 20
    ours = generate_tokens(model, PROMPTS, GenerationConfig(max_new_tokens=steps, batch_size=8))
    for prompt, tokens in zip(PROMPTS, ours):
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=steps,
            min_new_tokens=steps,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert tokens == out[0, len(prompt) :].tolist()


def test_eod_stops_a_row_and_is_not_returned():
    model = tiny_model()
    free = generate_tokens(model, PROMPTS[:2], GenerationConfig(max_new_tokens=12))
    eod = free[0][4]
    first = free[0].index(eod)
    stopped = generate_tokens(model, PROMPTS[:2], GenerationConfig(max_new_tokens=12), eod_id=eod)
    assert stopped[0] == free[0][:first]
    expected_second = free[1][: free[1].index(eod)] if eod in free[1] else free[1]
    assert stopped[1] == expected_second
    assert (
        generate_tokens(model, PROMPTS[:1], GenerationConfig(max_new_tokens=12, stop_at_eod=False), eod_id=eod)[0]
        == free[0]
    )


def test_max_positions_bound_the_generation():
    model = tiny_model()
    limit = model.config.max_position_embeddings
    out = generate_tokens(model, [[5] * (limit - 3)], GenerationConfig(max_new_tokens=50))
    assert len(out[0]) == 3
    with pytest.raises(ValueError, match="positions"):
        generate_tokens(model, [[5] * limit], GenerationConfig(max_new_tokens=1))


def test_top_p_keeps_the_smallest_nucleus_and_sampling_is_seeded():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(logits, False, 1.0, 0.8, gen) for _ in range(3000)]).flatten()
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    # Sorted: 0.5, 0.3 reach 0.8 -> nucleus {1, 3}, renormalized to 0.625 / 0.375 (by hand).
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.625) < 0.04 and abs(counts[3] - 0.375) < 0.04
    # Temperature: T=0.5 squares and renormalizes the probabilities.
    draws = torch.stack([sample_next_token(logits, False, 0.5, 1.0, gen) for _ in range(3000)]).flatten()
    p = torch.tensor([0.05, 0.5, 0.15, 0.3]) ** 2
    expected = p / p.sum()
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    assert torch.allclose(counts, expected.double(), atol=0.04)

    model = tiny_model()
    sampled = GenerationConfig(max_new_tokens=10, greedy=False, temperature=1.0, top_p=0.9, seed=123)
    assert generate_tokens(model, PROMPTS, sampled) == generate_tokens(model, PROMPTS, sampled)
    assert generate_tokens(model, PROMPTS, sampled) != generate_tokens(
        model, PROMPTS, GenerationConfig(max_new_tokens=10, greedy=False, seed=124)
    )
    # A vanishing nucleus is greedy.
    nucleus = GenerationConfig(max_new_tokens=10, greedy=False, top_p=1e-9, seed=5)
    assert generate_tokens(model, PROMPTS, nucleus) == generate_tokens(
        model, PROMPTS, GenerationConfig(max_new_tokens=10)
    )


def test_truncate_at_stop():
    assert truncate_at_stop("    return x\ndef g():\n", ["\ndef", "\nclass"]) == "    return x"
    assert truncate_at_stop("a\nclass B\ndef f", ["\ndef", "\nclass"]) == "a"
    assert truncate_at_stop("no stop here", ["\ndef"]) == "no stop here"


def test_text_generation_with_stop_sequences(codegen_tokenizer_dir):
    from megaphi.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(codegen_tokenizer_dir))
    model = tiny_model(vocab_size=tokenizer.padded_vocab_size, dtype=torch.float32, seed=7)
    prompts = ["def fibonacci(n):", "import os\n"]
    free = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=24))
    ids = tokenizer.encode(free[0])
    stop = tokenizer.decode(ids[10:12])
    assert stop and stop in free[0]
    stopped = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=24, stop_sequences=[stop]))
    assert stopped[0] == free[0][: free[0].index(stop)]
    assert stopped[1] == truncate_at_stop(free[1], [stop])


def _generate_under_tensor_parallel(rank, world_size, checkpoint, out_path):
    from megaphi.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        model = PhiForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)
        greedy = generate_tokens(model, PROMPTS, GenerationConfig(max_new_tokens=12))
        sampled = generate_tokens(model, PROMPTS, GenerationConfig(max_new_tokens=12, greedy=False, top_p=0.9, seed=9))
        torch.save({"greedy": greedy, "sampled": sampled}, f"{out_path}.{rank}")
    finally:
        destroy_model_parallel()


@pytest.mark.distributed
def test_tensor_parallel_generation_matches_single_rank(tmp_path):
    from dist_utils import run_distributed

    model = tiny_model()
    checkpoint = str(tmp_path / "ckpt")
    model.save_pretrained(checkpoint)
    expected = {
        "greedy": generate_tokens(model, PROMPTS, GenerationConfig(max_new_tokens=12)),
        "sampled": generate_tokens(
            model, PROMPTS, GenerationConfig(max_new_tokens=12, greedy=False, top_p=0.9, seed=9)
        ),
    }
    run_distributed(_generate_under_tensor_parallel, 2, checkpoint, str(tmp_path / "out"))
    for rank in range(2):
        assert torch.load(str(tmp_path / f"out.{rank}")) == expected

"""Batched autoregressive decoding for PhiForCausalLM: greedy, temperature and top-p sampling,
stop sequences, EOD stops, with or without the KV cache.

Batching and variable prompt lengths: the model's KV cache keeps one length for the whole batch and
attention has no padding mask, so prompts are grouped by token length and each group decodes as one
batch (rows that finished early keep being fed whatever token was sampled for them; their
output is ignored). Every row therefore
sees exactly the positions and keys it would see alone; the usual case of n samples of the same
prompt batches completely.

Sampling draws on the CPU from a torch.Generator, so a seed gives the same tokens on CPU and GPU
(up to logit rounding), and every tensor-parallel rank (they all see the full gathered logits) draws
the same tokens.
"""

import dataclasses
from collections import defaultdict
from typing import Callable, List, Optional, Sequence

import torch


@dataclasses.dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    stop_sequences: Sequence[str] = ()
    stop_at_eod: bool = True
    use_kv_cache: bool = True
    batch_size: int = 16
    seed: Optional[int] = None

    def validate(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature} (use greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def sample_next_token(
    logits: torch.Tensor,
    greedy: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch] (int64, on logits' device)."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        # Nucleus: keep the smallest prefix of the sorted distribution whose mass reaches top_p
        # (a token is dropped when the mass before it already reaches top_p; the top token always stays).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens.to(logits.device)


def _model_device(model):
    return next(model.parameters()).device


def _max_positions(model):
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


@torch.no_grad()
def _decode_group(model, prompts, config, eod_id, vocab_limit, generator, should_stop):
    device = _model_device(model)
    batch, prompt_len = len(prompts), len(prompts[0])
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    max_new = config.max_new_tokens
    limit = _max_positions(model)
    if limit is not None:
        if prompt_len >= limit:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room: the model has {limit} positions")
        max_new = min(max_new, limit - prompt_len)
    new_tokens = [[] for _ in range(batch)]
    if max_new == 0:
        return new_tokens
    finished = [False] * batch
    cache = model.allocate_kv_cache(batch, prompt_len + max_new) if config.use_kv_cache else None
    context = ids
    logits = _next_token_logits(model, ids, cache)
    for step in range(max_new):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits[:, :vocab_limit]  # the padded vocabulary rows are never real tokens
        next_tokens = sample_next_token(logits, config.greedy, config.temperature, config.top_p, generator)
        next_list = next_tokens.tolist()
        for row, token in enumerate(next_list):
            if finished[row]:
                continue
            if config.stop_at_eod and eod_id is not None and token == eod_id:
                finished[row] = True
                continue
            new_tokens[row].append(token)
            if should_stop is not None and should_stop(new_tokens[row]):
                finished[row] = True
        if all(finished) or step == max_new - 1:
            break
        step_input = next_tokens.view(batch, 1)
        if cache is not None:
            logits = _next_token_logits(model, step_input, cache)
        else:
            context = torch.cat([context, step_input], dim=1)
            logits = _next_token_logits(model, context, None)
    return new_tokens


def _next_token_logits(model, ids, cache):
    # logits_to_keep=1: only the last position goes through lm_head, so a long prompt never
    # materializes [batch, seq, vocab] logits.
    if cache is not None:
        return model(ids, kv_cache=cache, logits_to_keep=1)[:, -1]
    return model(ids, logits_to_keep=1)[:, -1]


def generate_tokens(
    model,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    eod_id: Optional[int] = None,
    vocab_limit: Optional[int] = None,
    should_stop: Optional[Callable[[List[int]], bool]] = None,
    generator: Optional[torch.Generator] = None,
) -> List[List[int]]:
    """New token ids per prompt (EOD excluded). should_stop(new_tokens) ends a row early."""
    config.validate()
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: empty prompt (megaphi never adds a BOS token; give at least one token)")
    if generator is None and config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)
    was_training = model.training
    model.eval()
    try:
        by_length = defaultdict(list)
        for index, prompt in enumerate(prompts):
            by_length[len(prompt)].append(index)
        outputs = [None] * len(prompts)
        for length in sorted(by_length):
            indices = by_length[length]
            for start in range(0, len(indices), config.batch_size):
                chunk = indices[start : start + config.batch_size]
                results = _decode_group(
                    model, [list(prompts[i]) for i in chunk], config, eod_id, vocab_limit, generator, should_stop
                )
                for i, tokens in zip(chunk, results):
                    outputs[i] = tokens
        return outputs
    finally:
        model.train(was_training)


def truncate_at_stop(text: str, stop_sequences: Sequence[str]) -> str:
    """Cut `text` at the earliest occurrence of any stop sequence (the stop itself is dropped)."""
    cut = len(text)
    for stop in stop_sequences:
        if stop:
            position = text.find(stop)
            if position != -1:
                cut = min(cut, position)
    return text[:cut]


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    config: Optional[GenerationConfig] = None,
    generator: Optional[torch.Generator] = None,
) -> List[str]:
    """Completions (text after each prompt), cut at the first stop sequence, EOD or max_new_tokens."""
    config = config or GenerationConfig()
    stops = [s for s in config.stop_sequences if s]
    should_stop = None
    if stops:
        longest = max(len(s) for s in stops)

        def should_stop(tokens):
            # Only the tail can hold a stop that just appeared; every token decodes to >= 0 chars, so
            # look at enough tokens to cover the longest stop sequence plus merges at the boundary.
            tail = tokenizer.decode(tokens[-(longest + 8) :])
            return any(s in tail for s in stops)

    prompt_ids = tokenizer.encode_batch(list(prompts))
    token_lists = generate_tokens(
        model,
        prompt_ids,
        config,
        eod_id=getattr(tokenizer, "eod_id", None),
        vocab_limit=getattr(tokenizer, "vocab_size", None),
        should_stop=should_stop,
        generator=generator,
    )
    return [truncate_at_stop(tokenizer.decode(tokens), stops) for tokens in token_lists]


def resolve_device_and_dtype(device: Optional[str] = None, dtype: Optional[str] = None):
    """--device/--dtype flags -> (torch.device, torch.dtype): CUDA + bf16 when there is a GPU, else CPU + fp32."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype is None:
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in names:
        raise ValueError(f"--dtype {dtype!r}: choose from {sorted(names)}")
    return device, names[dtype]


def load_model_and_tokenizer(
    checkpoint: str, tokenizer_path: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None
):
    """A model folder (megaphi, or Hugging Face phi with HF or MixFormer names) or training checkpoint
    (PhiForCausalLM.from_pretrained) and its tokenizer, ready to decode.

    The tokenizer defaults to the checkpoint folder when it holds tokenizer.json, else phi-1's
    (codegen-350M-mono, from the Hugging Face Hub)."""
    import os
    from megaphi.model import PhiForCausalLM
    from megaphi.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such directory")
    if tokenizer_path is None:
        tokenizer_path = checkpoint if os.path.exists(os.path.join(checkpoint, "tokenizer.json")) else DEFAULT_TOKENIZER
    device, torch_dtype = resolve_device_and_dtype(device, dtype)
    model = PhiForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype, device=device)
    model.eval()
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"--tokenizer {tokenizer_path}: {tokenizer.vocab_size} tokens, but the checkpoint's "
            f"vocabulary has only {model.config.vocab_size} rows"
        )
    return model, tokenizer

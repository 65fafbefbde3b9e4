"""Complete prompts with a megaphi checkpoint or a Hugging Face phi folder (HF or MixFormer names).

python tools/generate.py --checkpoint CKPT --prompt "def fibonacci(n):" --greedy
python tools/generate.py --checkpoint CKPT --prompt "def fibonacci(n):" --temperature 0.8 --top-p 0.95 --seed 1
"""

import argparse
import sys
import time

from megaphi.generation import GenerationConfig, generate, load_model_and_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="megaphi-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from megaphi.cli import add_version_flag

    add_version_flag(p)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="model folder (megaphi, or Hugging Face phi: config.json + safetensors/.bin) or training checkpoint",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json / folder / hub name (default: the checkpoint's, else codegen-350M-mono)",
    )
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default without --temperature/--top-p)")
    p.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (implies sampling)")
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable), e.g. $'\\ndef'")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")
    args = p.parse_args(argv)
    sampling = args.temperature is not None or args.top_p is not None
    if args.greedy and sampling:
        p.error("--greedy cannot be combined with --temperature/--top-p")
    if args.temperature is not None and args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 0 or args.num_samples < 1 or args.batch_size < 1:
        p.error("--max-new-tokens must be >= 0, --num-samples and --batch-size >= 1")
    if any(not prompt for prompt in args.prompt):
        p.error("--prompt must not be empty")
    args.greedy = not sampling
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        model, tokenizer = load_model_and_tokenizer(args.checkpoint, args.tokenizer, args.device, args.dtype)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        temperature=args.temperature or 1.0,
        top_p=args.top_p or 1.0,
        stop_sequences=tuple(args.stop),
        use_kv_cache=not args.no_kv_cache,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    prompts = [prompt for prompt in args.prompt for _ in range(args.num_samples)]
    start = time.perf_counter()
    completions = generate(model, tokenizer, prompts, config)
    elapsed = time.perf_counter() - start
    mode = (
        "greedy"
        if args.greedy
        else f"sampled (temperature {config.temperature}, top-p {config.top_p}, seed {args.seed})"
    )
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        print(f"=== completion {i + 1}/{len(prompts)} [{mode}] ===")
        print(prompt + completion)
    print(f"--- {len(prompts)} completion(s) in {elapsed:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

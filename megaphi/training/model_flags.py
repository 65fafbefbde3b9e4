"""The model flags of megaphi.pretrain resolved into a whole architecture.

An override carries what depends on it: a head dimension changed by --hidden-size or
--num-attention-heads keeps the preset's share of each head that is rotated (phi-1: 32 of 64 -> half),
unless --rotary-dim or --rotary-percent says otherwise. Finetuning (or evaluating) a model folder takes
the architecture and the dropouts from the folder's config.json; an architecture flag that contradicts
the weights is an error, a dropout flag wins.
"""

import os

from .argument_error import ArgumentError

# flag (args attribute) -> PhiConfig field
ARCH_FIELDS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "rotary_dim": "rotary_dim",
    "vocab_size": "vocab_size",
}
OTHER_FIELDS = {
    "max_position_embeddings": "max_position_embeddings",
    "attention_dropout": "attention_dropout",
    "hidden_dropout": "resid_dropout",
    "embedding_dropout": "embd_dropout",
    "init_method_std": "initializer_range",
}


def _flag(name):
    return "--" + name.replace("_", "-")


def folder_to_finetune(args):
    """The model folder --finetune/--skip-train --load reads its weights from, or None (a DeepSpeed-only
    checkpoint, or no such run)."""
    if not (args.finetune or args.skip_train) or not args.load or not os.path.isdir(args.load):
        return None
    from megaphi.checkpoint import layout, model_folder

    if model_folder.is_model_folder(args.load):
        return args.load
    try:
        tag = layout.read_pointer(args.load)
    except layout.CheckpointError as e:
        raise ArgumentError(str(e)) from None
    exported = os.path.join(args.load, tag, layout.MODEL_SUBDIR) if tag else None
    return exported if exported and model_folder.is_model_folder(exported) else None


def read_folder_config(folder):
    """PhiConfig of a megaphi or Hugging Face phi model folder (config.json only, no weights)."""
    import json

    from megaphi.config import PhiConfig
    from megaphi.checkpoint.hf_config import config_from_hf_dict

    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            d = json.load(f)
        if isinstance(d, dict) and ("model_type" in d or "n_embd" in d):
            return config_from_hf_dict(d, path)
        return PhiConfig.from_json_file(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ArgumentError(f"--load {folder}: cannot read {path}: {e}") from None


def _adopt_folder(args, folder, typed):
    config = read_folder_config(folder)
    for name, field in ARCH_FIELDS.items():
        saved = getattr(config, field)
        if name in typed and getattr(args, name) != saved:
            raise ArgumentError(
                f"{_flag(name)} {getattr(args, name)} contradicts --load {folder}'s {saved} "
                f"(the weights' shape); leave the flag out to take the folder's"
            )
        setattr(args, name, saved)
    dropouts = []
    for name, field in OTHER_FIELDS.items():
        if name not in typed:
            setattr(args, name, getattr(config, field))
        if name.endswith("dropout"):
            dropouts.append(f"{_flag(name)} {getattr(args, name):g}" + ("" if name in typed else " (folder)"))
    args.base_model_config = config  # norms' eps, rope base, activation: the folder's too
    args.flag_notes.append(
        f"--load {folder}: architecture and dropout from the folder ({config.num_hidden_layers} "
        f"layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, vocabulary "
        f"{config.vocab_size}; {', '.join(dropouts)})"
    )


def scaled_rotary_dim(preset, head_dim):
    """The preset's rotated share of a head applied to another head dimension, rounded down to an even
    number (at least 2)."""
    share = preset.rotary_dim / (preset.hidden_size // preset.num_attention_heads)
    return max(2, int(head_dim * share) // 2 * 2)


def resolve_model(args):
    """Fill the model fields: the --load folder's when finetuning one, else the preset's; typed flags win
    (dropouts) or must agree (the architecture, when a folder's weights fix it)."""
    from megaphi.config import get_preset

    preset = get_preset(args.model)
    typed = {name for name in (*ARCH_FIELDS, *OTHER_FIELDS) if getattr(args, name) is not None}
    if getattr(args, "rotary_percent", None) is not None:
        if "rotary_dim" in typed:
            raise ArgumentError("--rotary-percent and --rotary-dim exclude each other")
        if not 0 < args.rotary_percent <= 1:
            raise ArgumentError(f"--rotary-percent must be in (0, 1], got {args.rotary_percent}")
    args.base_model_config = None
    folder = folder_to_finetune(args)
    if folder is not None:
        _adopt_folder(args, folder, typed)
    for name, field in {**ARCH_FIELDS, **OTHER_FIELDS}.items():
        if getattr(args, name) is None and name not in ("rotary_dim", "vocab_size"):
            setattr(args, name, getattr(preset, field))
    heads, hidden = args.num_attention_heads, args.hidden_size
    if heads > 0 and hidden > 0 and hidden % heads == 0 and args.rotary_dim is None:
        head_dim = hidden // heads
        if getattr(args, "rotary_percent", None) is not None:
            rotary = head_dim * args.rotary_percent
            if rotary != int(rotary) or int(rotary) % 2:
                raise ArgumentError(
                    f"--rotary-percent {args.rotary_percent:g} gives rotary dim {rotary:g} of head "
                    f"dim {head_dim}; it must be an even whole number"
                )
            args.rotary_dim = int(rotary)
        elif head_dim == preset.hidden_size // preset.num_attention_heads:
            args.rotary_dim = preset.rotary_dim
        else:
            args.rotary_dim = scaled_rotary_dim(preset, head_dim)
    if args.rotary_dim is None:
        args.rotary_dim = preset.rotary_dim  # hidden/heads invalid: validate_args names those flags
    if args.seq_length is None:
        args.seq_length = args.max_position_embeddings


def model_vocab_size(args, tokenizer):
    """Rows of the embedding and lm_head for a run with a tokenizer.

    The preset's vocabulary is kept when the tokenizer fits in it and it satisfies the TP padding
    rule: phi-1 with the codegen tokenizer (50295 tokens) keeps 51200 rows, the shape of the released
    checkpoints, rather than Megatron's 50304. Otherwise the tokenizer's size padded to
    --make-vocab-size-divisible-by x TP. A --vocab-size given (or a finetuned folder's) is used as is.
    """
    from megaphi.config import get_preset

    if getattr(args, "vocab_size", None) is not None:
        if args.vocab_size < tokenizer.vocab_size:
            raise ArgumentError(
                f"--vocab-size {args.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens"
            )
        return args.vocab_size
    preset_vocab = get_preset(args.model).vocab_size
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    if tokenizer.vocab_size <= preset_vocab and preset_vocab % multiple == 0:
        return preset_vocab
    return tokenizer.padded_vocab_size


def load_run_tokenizer(args):
    """The --tokenizer (or --vocab-file/--merge-file); a path typo that looks like a hub name fails
    offline with an OSError, reported as a one-line ArgumentError."""
    from megaphi.tokenizer import load_bpe_files, load_tokenizer

    if getattr(args, "vocab_file", None):  # Megatron's GPT2BPETokenizer
        try:
            return load_bpe_files(
                args.vocab_file, args.merge_file, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
            )
        except (OSError, ValueError) as e:
            raise ArgumentError(f"--vocab-file/--merge-file: {e}") from None
    try:
        return load_tokenizer(args.tokenizer, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    except (OSError, ValueError) as e:
        raise ArgumentError(f"--tokenizer {args.tokenizer}: cannot load it: {e}") from None

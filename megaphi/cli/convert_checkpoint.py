"""Convert phi checkpoints between Hugging Face and megaphi.

  hf-to-megaphi HF_DIR OUT          HF Phi folder (config.json + model.safetensors / pytorch_model.bin,
                                    sharded with an index json or not; HF Phi names or the original
                                    MixFormer names) -> megaphi folder (config.json + model.safetensors)
  megaphi-to-hf CKPT OUT_DIR        megaphi checkpoint (model folder, or a training checkpoint DIR /
                [--tokenizer DIR]   DIR/<tag> saved at any TP size) -> HF folder that transformers'
                                    PhiForCausalLM.from_pretrained loads (tokenizer files copied in)
  reshard CKPT OUT --tp N           training checkpoint (DIR with `latest`, or DIR/<tag>) saved at one
                                    tensor-model-parallel size -> the same weights as N TP shards.
                                    Model weights only: the ZeRO optimizer state is dropped (a run
                                    resumed from OUT restarts the optimizer, keeps iteration, lr
                                    schedule and data position); megaphi model folders are
                                    TP-independent and need none.

Tensors are copied bit for bit unless --dtype asks for a cast. Output folders are written under a
temporary name and renamed when complete.
"""
import argparse
import os
import shutil
import tempfile

import torch

from megaphi.model.checkpoint import load_megaphi_state, save_megaphi_folder  # noqa: E402
from megaphi.model.hf_checkpoint import hf_token_ids, read_hf_checkpoint  # noqa: E402
from megaphi.model.hf_config import config_from_hf_dict  # noqa: E402,F401
from megaphi.model.sharded_checkpoint import (  # noqa: E402
    META_NAME, is_training_checkpoint, read_training_checkpoint, split_state, training_state_extras,
    write_training_checkpoint)
from megaphi.model.checkpoint import apply_default_modes, save_json  # noqa: E402
from megaphi.training.checkpoint_integrity import HASH_NAME, checksum_and_sync, seal_metadata  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- writing ----------------------------------------------------------------------------------------

def _write_folder(out_dir, fill):
    """fill(tmp_dir) writes the files; then tmp_dir becomes out_dir (which must be absent or empty)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not empty")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        fill(tmp)
        apply_default_modes(tmp)  # mkdtemp makes 0700: give the umask's modes, as a plain mkdir would
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cast(state, dtype_name):
    if dtype_name in (None, "keep"):
        return state
    return {k: v.to(DTYPES[dtype_name]) for k, v in state.items()}


def hf_to_megaphi(hf_dir, out_dir, dtype=None, overrides=None):
    config, state = read_hf_checkpoint(hf_dir)
    if overrides:
        config = config.replace(**overrides)
    state = _cast(state, dtype)
    bos, eos = hf_token_ids(hf_dir)
    _write_folder(out_dir, lambda tmp: save_megaphi_folder(tmp, config, state, bos, eos))
    return config


def megaphi_to_hf(ckpt, out_dir, tokenizer_dir=None, dtype=None):
    config, state = load_megaphi_state(ckpt)
    state = _cast(state, dtype)

    token_ids = hf_token_ids(ckpt) if os.path.isfile(os.path.join(ckpt, "config.json")) else (None, None)

    def fill(tmp):
        save_megaphi_folder(tmp, config, state, *token_ids)  # an HF folder (config + generation config)
        if tokenizer_dir:
            copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
            if not copied:
                raise FileNotFoundError(f"--tokenizer {tokenizer_dir}: none of {TOKENIZER_FILES} found")
            for name in copied:
                shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
    _write_folder(out_dir, fill)
    return config


def reshard(ckpt, out_dir, tp):
    """Re-split a training checkpoint's model weights for `tp` TP ranks (optimizer state dropped)."""
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    if not is_training_checkpoint(ckpt):
        if os.path.isfile(os.path.join(ckpt, "config.json")) and os.path.isfile(os.path.join(ckpt, "model.safetensors")):
            raise ValueError(f"{ckpt} is a megaphi model folder: its tensors are full (TP-independent) and load at "
                             f"any --tensor-model-parallel-size; reshard takes training checkpoints")
        raise ValueError(f"{ckpt}: not a megaphi training checkpoint (expected a `latest` file or "
                         f"{META_NAME} with mp_rank_XX_model_states.pt files)")
    config, full, meta, tag_dir = read_training_checkpoint(ckpt)
    source_tp = meta.get("tensor_model_parallel_size", 1)
    shards = split_state(full, config, tp, source=tag_dir)
    new_meta = dict(meta)
    new_meta.update({"tensor_model_parallel_size": tp, "optimizer_states": False,
                     "resharded_from": {"path": tag_dir, "tensor_model_parallel_size": source_tp}})
    new_meta.pop("files", None)  # the source's checksums; the output's are recorded below
    if isinstance(new_meta.get("args"), dict):
        new_meta["args"] = {**new_meta["args"], "tensor_model_parallel_size": tp}
    tag = os.path.basename(tag_dir.rstrip(os.sep))

    def fill(tmp):
        write_training_checkpoint(tmp, tag, shards, new_meta, training_state_extras(tag_dir))
        exported = os.path.join(tag_dir, "model")  # the full-tensor model folder, if the run wrote one
        if os.path.isdir(exported):
            shutil.copytree(exported, os.path.join(tmp, tag, "model"))
        # checksums of the new files, so a run resuming from OUT verifies them like any checkpoint
        new_meta["files"] = checksum_and_sync(os.path.join(tmp, tag), META_NAME)
        new_meta["checksum"] = HASH_NAME
        save_json(os.path.join(tmp, tag, META_NAME), seal_metadata(new_meta))  # its own checksum, recomputed
    _write_folder(out_dir, fill)
    return config, source_tp


def main(argv=None):
    parser = argparse.ArgumentParser(prog="megaphi-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from megaphi.cli import add_version_flag
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megaphi", help="Hugging Face Phi folder -> megaphi folder")
    a.add_argument("hf_dir")
    a.add_argument("out")
    a.add_argument("--dtype", choices=["keep", *DTYPES], default="keep")
    a.add_argument("--attention-dropout", type=float, help="override (HF checkpoints ship 0.0; the paper trains with 0.1)")
    a.add_argument("--resid-dropout", type=float, help="override (HF checkpoints ship 0.0; the paper trains with 0.1)")
    b = sub.add_parser("megaphi-to-hf", help="megaphi checkpoint -> Hugging Face PhiForCausalLM folder")
    b.add_argument("ckpt")
    b.add_argument("out_dir")
    b.add_argument("--tokenizer", help="folder with tokenizer files to copy into the export")
    b.add_argument("--dtype", choices=["keep", *DTYPES], default="keep")
    c = sub.add_parser("reshard", help="training checkpoint at one TP size -> the same weights at --tp N")
    c.add_argument("ckpt")
    c.add_argument("out")
    c.add_argument("--tp", type=int, required=True, help="target tensor-model-parallel size")
    args = parser.parse_args(argv)
    try:  # a missing or wrong input is one line, not a traceback
        if args.command == "reshard":
            config, source_tp = reshard(args.ckpt, args.out, args.tp)
            print(f"wrote {args.out}: TP {source_tp} -> {args.tp}, {config.num_hidden_layers} layers, "
                  f"hidden {config.hidden_size}, vocab {config.vocab_size} (model weights only; optimizer state "
                  f"dropped)")
            return
        if args.command == "hf-to-megaphi":
            overrides = {k: v for k, v in (("attention_dropout", args.attention_dropout),
                                           ("resid_dropout", args.resid_dropout)) if v is not None}
            config = hf_to_megaphi(args.hf_dir, args.out, args.dtype, overrides)
        else:
            config = megaphi_to_hf(args.ckpt, args.out_dir, args.tokenizer, args.dtype)
    except (ValueError, OSError, KeyError) as e:  # FileNotFoundError, FileExistsError are OSErrors
        message = str(e) if not isinstance(e, KeyError) else f"missing entry {e}"
        parser.exit(2, f"megaphi-convert {args.command}: error: {message}\n")
    print(f"wrote {getattr(args, 'out', None) or args.out_dir}: {config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size}")


if __name__ == "__main__":
    main()

"""Convert phi checkpoints between Hugging Face and megaphi.

  hf-to-megaphi HF_DIR OUT          HF Phi folder (config.json + model.safetensors / pytorch_model.bin,
                                    sharded with an index json or not; HF Phi names or the original
                                    MixFormer names) -> megaphi folder (config.json + model.safetensors)
  megaphi-to-hf CKPT OUT_DIR        megaphi checkpoint (model folder, or a training checkpoint DIR /
                [--tokenizer DIR]   DIR/<tag> saved at any TP size) -> HF folder that transformers'
                                    PhiForCausalLM.from_pretrained loads (tokenizer files copied in)
  reshard CKPT OUT --tp N [--pp P]  training checkpoint (DIR with `latest`, or DIR/<tag>) saved at one
                                    (pipeline, tensor) layout -> the same weights as N TP shards over
                                    P pipeline stages (default 1; layers split evenly).
                                    Model weights only: the ZeRO optimizer state is dropped (a run
                                    resumed from OUT restarts the optimizer, keeps iteration, lr
                                    schedule and data position); megaphi model folders are
                                    TP-independent and need none.

Tensors are copied bit for bit unless --dtype asks for a cast. Output folders are written under a
temporary name and renamed when complete.
"""

import argparse

from megaphi.checkpoint.convert import DTYPES, hf_to_megaphi, megaphi_to_hf
from megaphi.checkpoint.reshard import reshard as reshard_checkpoint
from megaphi.model.phi import PhiForCausalLM


def reshard(ckpt, out, tp, pp=1):
    """The phi model's training checkpoint `ckpt` re-split for `tp` TP ranks and `pp` pipeline stages into
    `out`: (PhiConfig, source TP)."""
    return reshard_checkpoint(ckpt, out, tp, model_class=PhiForCausalLM, pp=pp)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="megaphi-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from megaphi.cli import add_version_flag

    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megaphi", help="Hugging Face Phi folder -> megaphi folder")
    a.add_argument("hf_dir")
    a.add_argument("out")
    a.add_argument("--dtype", choices=["keep", *DTYPES], default="keep")
    a.add_argument(
        "--attention-dropout", type=float, help="override (HF checkpoints ship 0.0; the paper trains with 0.1)"
    )
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
    c.add_argument("--pp", type=int, default=1, help="target pipeline-model-parallel size (even layer split)")
    args = parser.parse_args(argv)
    try:  # a missing or wrong input is one line, not a traceback
        if args.command == "reshard":
            config, source_tp = reshard(args.ckpt, args.out, args.tp, args.pp)
            print(
                f"wrote {args.out}: TP {source_tp} -> {args.tp}, PP {args.pp}, {config.num_hidden_layers} layers, "
                f"hidden {config.hidden_size}, vocab {config.vocab_size} (model weights only; optimizer state "
                f"dropped)"
            )
            return
        if args.command == "hf-to-megaphi":
            overrides = {
                k: v
                for k, v in (("attention_dropout", args.attention_dropout), ("resid_dropout", args.resid_dropout))
                if v is not None
            }
            config = hf_to_megaphi(args.hf_dir, args.out, args.dtype, overrides)
        else:
            config = megaphi_to_hf(args.ckpt, args.out_dir, args.tokenizer, args.dtype)
    except (ValueError, OSError, KeyError) as e:  # FileNotFoundError, FileExistsError are OSErrors
        message = str(e) if not isinstance(e, KeyError) else f"missing entry {e}"
        parser.exit(2, f"megaphi-convert {args.command}: error: {message}\n")
    print(
        f"wrote {getattr(args, 'out', None) or args.out_dir}: {config.num_hidden_layers} layers, "
        f"hidden {config.hidden_size}, vocab {config.vocab_size}"
    )


if __name__ == "__main__":
    main()

"""What a Megatron-LM / Megatron-DeepSpeed user types: their flags accepted with Megatron's meaning (or a
one-line note where megaphi already works that way), flags that contradict phi's architecture refused in
one line, an unknown flag answered with one line and the closest known flag; architecture overrides that
carry their dependents (rotary dim, vocabulary); finetuning takes the architecture from the folder."""

import subprocess
import sys

import pytest

from megaphi.training.arguments import ArgumentError, parse_args
from megaphi.training.deepspeed_config import build_deepspeed_config
from test_megatron_flags import prefix  # noqa: F401 (a fixture: a one-document token file)


def _args(*extra, model="tiny", world_size=1):
    return parse_args(
        ["--model", model, "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "4", "--mock-data", *extra],
        world_size=world_size,
    )


def test_attention_flags_take_megatrons_values():
    assert _args("--use-flash-attn").attention_backend == "flash-attn"
    for megatron, megaphi in (
        ("flash", "flash-attn"),
        ("fused", "sdpa-cudnn"),
        ("unfused", "math"),
        ("auto", "auto"),
        ("math", "math"),
    ):
        assert _args("--attention-backend", megatron).attention_backend == megaphi, megatron
    with pytest.raises(ArgumentError, match="--use-flash-attn and --attention-backend math"):
        _args("--use-flash-attn", "--attention-backend", "math")


def test_rotary_flags():
    args = _args("--position-embedding-type", "rope", "--rotary-percent", "0.25")  # tiny: head dim 64
    assert args.rotary_dim == 16
    with pytest.raises(ArgumentError, match="--position-embedding-type learned_absolute: phi uses rotary"):
        _args("--position-embedding-type", "learned_absolute")
    with pytest.raises(ArgumentError, match="--rotary-percent and --rotary-dim exclude each other"):
        _args("--rotary-percent", "0.5", "--rotary-dim", "32")
    with pytest.raises(ArgumentError, match=r"--rotary-percent 0.3 gives rotary dim 19.2 .*even"):
        _args("--rotary-percent", "0.3")


def test_notes_for_what_megaphi_already_does():
    args = _args(
        "--untie-embeddings-and-output-weights",
        "--log-throughput",
        "--log-memory-to-tensorboard",
        "--log-validation-ppl-to-tensorboard",
        "--deepspeed",
        "--timing-log-level",
        "2",
        "--log-params-norm",
    )
    notes = "\n".join(args.flag_notes)
    assert len(args.flag_notes) == 7, notes
    for flag, words in (
        ("--untie-embeddings-and-output-weights", "untied"),
        ("--log-throughput", "TFLOP/s"),
        ("--log-memory-to-tensorboard", "mem-max-allocated-bytes"),
        ("--log-validation-ppl-to-tensorboard", "lm loss validation ppl"),
        ("--deepspeed", "DeepSpeed"),
        ("--timing-log-level", "iteration-time"),
        ("--log-params-norm", "params-norm"),
    ):
        line = next(n for n in args.flag_notes if n.startswith(flag))
        assert words in line and "\n" not in line, line
    assert _args().flag_notes == []


def test_distributed_optimizer_and_overlap_are_zero_settings():
    args = _args("--use-distributed-optimizer", "--overlap-grad-reduce")
    assert args.zero_stage == 1  # one data-parallel rank would otherwise run ZeRO 0
    config = build_deepspeed_config(args)
    assert config["zero_optimization"]["stage"] == 1 and config["zero_optimization"]["overlap_comm"] is True
    assert build_deepspeed_config(_args(world_size=2))["zero_optimization"]["overlap_comm"] is False
    with pytest.raises(ArgumentError, match="--use-distributed-optimizer .* --zero-stage 0"):
        _args("--use-distributed-optimizer", "--zero-stage", "0")


def test_megatron_deepspeed_config_spelling(tmp_path):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    args = _args("--deepspeed", "--deepspeed_config", str(tmp_path / "ds.json"))
    assert args.deepspeed_config == str(tmp_path / "ds.json")
    assert build_deepspeed_config(args)["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--swiglu"], "--swiglu: phi's MLP is fc1 -> gelu_tanh -> fc2"),
        (["--group-query-attention"], "--group-query-attention: phi uses multi-head attention"),
        (["--num-query-groups", "4"], "--num-query-groups: phi uses multi-head attention"),
        (["--normalization", "RMSNorm"], "--normalization RMSNorm: phi uses LayerNorm"),
        (["--disable-bias-linear"], "--disable-bias-linear: every phi Linear has a bias"),
    ],
)
def test_contradicting_the_architecture_is_one_line(flags, reason):
    with pytest.raises(ArgumentError) as e:
        _args(*flags)
    assert str(e.value).startswith(reason) and "\n" not in str(e.value)
    assert _args("--normalization", "LayerNorm").flag_notes == []  # what phi is: nothing to say


def _cli(*argv):
    return subprocess.run(
        [sys.executable, "-m", "megaphi.pretrain", *argv], capture_output=True, text=True, timeout=120
    )


def test_unknown_flag_is_one_line_with_the_closest_flag():
    proc = _cli(
        "--model",
        "tiny",
        "--micro-batch-size",
        "2",
        "--lr",
        "1e-3",
        "--train-iters",
        "2",
        "--mock-data",
        "--tensor-parallel-size",
        "2",
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "megaphi.pretrain: error: unrecognized argument --tensor-parallel-size "
        "(did you mean --tensor-model-parallel-size?); --help lists the flags"
    ]
    proc = _cli("--model", "tiny", "--zero-stage", "x")  # argparse's own errors: the same prefix, one line
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["megaphi.pretrain: error: argument --zero-stage: invalid int value: 'x'"]


def test_version():
    from megaphi import __version__

    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"megaphi.pretrain {__version__}"


def test_gpt2_bpe_vocab_and_merge_files(codegen_tokenizer_dir, tmp_path):
    import shutil

    from tokenizers import Tokenizer

    from megaphi.training.model_flags import load_run_tokenizer

    text = "def f(x):\n    return x  # ünï 日本\n"
    # a bare pair (Megatron's usual names): GPT-2's byte-level BPE, as transformers' GPT2Tokenizer reads it
    bare = tmp_path / "bare"
    bare.mkdir()
    vocab, merges = bare / "gpt2-vocab.json", bare / "gpt2-merges.txt"
    shutil.copy(codegen_tokenizer_dir / "vocab.json", vocab)
    shutil.copy(codegen_tokenizer_dir / "merges.txt", merges)
    args = _args("--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab), "--merge-file", str(merges))
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2Tokenizer(vocab=str(vocab), merges=str(merges))
    tok = load_run_tokenizer(args)
    assert tok.encode(text) == gpt2.encode(text) and tok.eod_id == gpt2.convert_tokens_to_ids("<|endoftext|>")
    # codegen's own folder (added_tokens.json beside the pair: its whitespace tokens): its tokenizer.json's ids
    args = _args(
        "--vocab-file",
        str(codegen_tokenizer_dir / "vocab.json"),
        "--merge-file",
        str(codegen_tokenizer_dir / "merges.txt"),
    )
    reference = Tokenizer.from_file(str(codegen_tokenizer_dir / "tokenizer.json"))
    assert load_run_tokenizer(args).encode(text) == reference.encode(text, add_special_tokens=False).ids
    with pytest.raises(ArgumentError, match="--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file"):
        _args("--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab))
    with pytest.raises(ArgumentError, match=f"--merge-file: {tmp_path / 'nope.txt'} does not exist"):
        _args("--vocab-file", str(vocab), "--merge-file", str(tmp_path / "nope.txt"))
    with pytest.raises(ArgumentError, match="--vocab-file/--merge-file and --tokenizer exclude each other"):
        _args("--vocab-file", str(vocab), "--merge-file", str(merges), "--tokenizer", str(codegen_tokenizer_dir))


# ----------------------------------------------------------------------------- item 5: dependents
def test_small_architecture_on_the_default_preset_scales_the_rotary_dim():
    args = parse_args(
        [
            "--num-layers",
            "2",
            "--hidden-size",
            "64",
            "--num-attention-heads",
            "4",
            "--micro-batch-size",
            "1",
            "--lr",
            "1e-3",
            "--train-iters",
            "1",
            "--mock-data",
        ],
        world_size=1,
    )
    assert args.rotary_dim == 8  # phi-1 rotates half of each head: 32 of 64 -> 8 of 16
    args = parse_args(
        [
            "--model",
            "phi-1-small",
            "--hidden-size",
            "512",
            "--num-attention-heads",
            "4",
            "--micro-batch-size",
            "1",
            "--lr",
            "1e-3",
            "--train-iters",
            "1",
            "--mock-data",
        ],
        world_size=1,
    )
    assert args.rotary_dim == 64  # head dim 128
    with pytest.raises(ArgumentError, match="--rotary-dim 32 must be even and <= head dim 16"):
        parse_args(
            [
                "--hidden-size",
                "64",
                "--num-attention-heads",
                "4",
                "--rotary-dim",
                "32",
                "--micro-batch-size",
                "1",
                "--lr",
                "1e-3",
                "--train-iters",
                "1",
                "--mock-data",
            ],
            world_size=1,
        )


def test_vocab_size_flag_is_not_padded_to_the_presets(codegen_tokenizer_dir):
    from megaphi.training.model_flags import load_run_tokenizer, model_vocab_size

    args = _args("--vocab-size", "50432", "--tokenizer", str(codegen_tokenizer_dir), model="phi-1")
    assert model_vocab_size(args, load_run_tokenizer(args)) == 50432
    args = _args("--tokenizer", str(codegen_tokenizer_dir), model="phi-1")
    assert model_vocab_size(args, load_run_tokenizer(args)) == 51200  # the released checkpoints' rows
    args = _args("--vocab-size", "1000", "--tokenizer", str(codegen_tokenizer_dir))
    with pytest.raises(ArgumentError, match="--vocab-size 1000 is smaller than the tokenizer's 50295 tokens"):
        model_vocab_size(args, load_run_tokenizer(args))


@pytest.fixture
def hf_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.PhiConfig(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=6,
        partial_rotary_factor=0.5,
        max_position_embeddings=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )
    folder = tmp_path / "hf"
    transformers.PhiForCausalLM(config).save_pretrained(str(folder))
    return folder


def test_finetune_takes_architecture_and_dropout_from_the_folder(hf_folder):
    args = parse_args(
        [
            "--finetune",
            "--load",
            str(hf_folder),
            "--micro-batch-size",
            "1",
            "--lr",
            "1e-4",
            "--train-iters",
            "1",
            "--mock-data",
        ],
        world_size=1,
    )
    assert (
        args.num_layers,
        args.hidden_size,
        args.ffn_hidden_size,
        args.num_attention_heads,
        args.rotary_dim,
        args.vocab_size,
        args.max_position_embeddings,
        args.seq_length,
    ) == (3, 96, 192, 6, 8, 320, 128, 128)
    assert (args.attention_dropout, args.hidden_dropout, args.embedding_dropout) == (0.0, 0.0, 0.0)
    assert any("architecture and dropout from" in n for n in args.flag_notes)
    args = parse_args(
        [
            "--finetune",
            "--load",
            str(hf_folder),
            "--micro-batch-size",
            "1",
            "--lr",
            "1e-4",
            "--train-iters",
            "1",
            "--mock-data",
            "--attention-dropout",
            "0.1",
            "--hidden-dropout",
            "0.1",
        ],
        world_size=1,
    )
    assert (args.attention_dropout, args.hidden_dropout) == (0.1, 0.1)  # given: kept
    with pytest.raises(ArgumentError, match=r"--hidden-size 64 contradicts .*hf's 96"):
        parse_args(
            [
                "--finetune",
                "--load",
                str(hf_folder),
                "--hidden-size",
                "64",
                "--micro-batch-size",
                "1",
                "--lr",
                "1e-4",
                "--train-iters",
                "1",
                "--mock-data",
            ],
            world_size=1,
        )

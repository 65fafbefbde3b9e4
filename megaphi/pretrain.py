"""Pretrain or finetune a phi-1-class model: `python -m megaphi.pretrain --help`.

Runs under the `deepspeed` launcher, `torchrun`, or as one plain process (a 1-rank group is made).
"""
import errno
import math
import os
import random
import socket
import time
import sys

import numpy as np
import torch
import torch.distributed as dist

from megaphi.checkpoint import layout, lock, model_folder, resume_checks, training_state
from megaphi.training.arguments import ArgumentError, parse_args
from megaphi.training import dist_timeout, launcher_watch, peer_loss
from megaphi.training.multinode import check_save_folder, warn_elastic_store
from megaphi.training.deepspeed_config import build_deepspeed_config
from megaphi.training.data_sources import data_description
from megaphi.training.metrics import open_metrics_writer
from megaphi.training.signals import GracefulExit
from megaphi.training.run_info import log_run_setup
from megaphi.training.messages import deepspeed_logs_to_stderr, say_rank0
from megaphi.training.train_loop import TrainingError, TrainState, print_rank0, train


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def init_distributed(backend=None, timeout_minutes=None):
    """Join the launcher's process group, or make a 1-rank one for a plain `python -m` run.
    timeout_minutes (--distributed-timeout-minutes) bounds every collective of every group."""
    if dist.is_initialized():
        return
    single_process = "RANK" not in os.environ  # no launcher
    if single_process:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", _free_port())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    kwargs = {}
    if timeout_minutes is not None:
        kwargs["timeout"] = dist_timeout.set_default_timeout(timeout_minutes)
    if single_process:
        # an in-process store: no TCP port to bind, so concurrent single-process runs never collide
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group(backend, **kwargs)


def build_model_config(args, padded_vocab_size):
    import copy

    from megaphi.config import get_preset

    # finetuning a model folder: its config (eps, rope base, activation) under the flags' fields
    base = getattr(args, "base_model_config", None)
    config = copy.deepcopy(base) if base is not None else get_preset(args.model)
    overrides = {
        "num_hidden_layers": args.num_layers, "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size, "num_attention_heads": args.num_attention_heads,
        "rotary_dim": args.rotary_dim, "max_position_embeddings": args.max_position_embeddings,
        "attention_dropout": args.attention_dropout, "resid_dropout": args.hidden_dropout,
        "embd_dropout": args.embedding_dropout, "initializer_range": args.init_method_std,
    }
    if padded_vocab_size is not None:
        overrides["vocab_size"] = padded_vocab_size
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_model_runtime(args):
    """How this run's model runs (megaphi.model.ModelRuntime): the recompute, loss-chunk, attention,
    sequence-parallel and --torch-compile flags. Never part of the exported config."""
    from megaphi.model import ModelRuntime
    from megaphi.model.compile import compile_enabled

    granularity = args.recompute_granularity or ("full" if args.recompute else None)
    return ModelRuntime(
        recompute=granularity or "none", recompute_num_layers=args.recompute_num_layers,
        loss_chunk_tokens=args.loss_chunk_tokens, attention_backend=args.attention_backend,
        # Megatron turns sequence parallel off at TP=1, where it changes nothing
        sequence_parallel=bool(args.sequence_parallel and args.tensor_model_parallel_size > 1),
        compile=compile_enabled(args.torch_compile, "cuda" if torch.cuda.is_available() else "cpu"))


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
            raise ArgumentError(f"--vocab-size {args.vocab_size} is smaller than the tokenizer's "
                                f"{tokenizer.vocab_size} tokens")
        return args.vocab_size
    preset_vocab = get_preset(args.model).vocab_size
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    if tokenizer.vocab_size <= preset_vocab and preset_vocab % multiple == 0:
        return preset_vocab
    return tokenizer.padded_vocab_size


def load_run_tokenizer(args):
    """The --tokenizer; a path typo that looks like a hub name fails offline with an OSError."""
    from megaphi.tokenizer import load_bpe_files, load_tokenizer

    if getattr(args, "vocab_file", None):  # Megatron's GPT2BPETokenizer
        try:
            return load_bpe_files(args.vocab_file, args.merge_file, args.make_vocab_size_divisible_by,
                                  args.tensor_model_parallel_size)
        except (OSError, ValueError) as e:
            raise ArgumentError(f"--vocab-file/--merge-file: {e}") from None
    try:
        return load_tokenizer(args.tokenizer, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)
    except (OSError, ValueError) as e:
        raise ArgumentError(f"--tokenizer {args.tokenizer}: cannot load it: {e}") from None


def set_seed(seed):
    from megaphi.parallel.random import model_parallel_seed

    random.seed(seed)
    np.random.seed(seed)
    model_parallel_seed(seed)  # torch default stream + the tensor-parallel stream


def _iterate(loader):
    """iter(DataLoader) draws a base seed from torch's default generator; keep that draw from shifting
    the dropout stream, so a resumed run (which makes its iterator at a different point) matches."""
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def evaluation_enabled(args):
    return args.eval_iters > 0 and args.eval_interval is not None


def build_data(args, dp_rank, dp_size, consumed_samples=0, vocab_size=None):
    """(make_train_iterator, make_valid_iterator or None). The test split is never read by the
    trainer, so it is not built (a small file may leave it without documents); neither is the
    validation split when evaluation is off. With vocab_size, a token id the model cannot embed
    is an error naming the dataset (megaphi.data.token_check)."""
    from megaphi.training.data_sources import build_split_datasets

    gbs = args.global_batch_size
    needed = args.train_iters * gbs
    evaluate = evaluation_enabled(args)
    splits = ("train", "valid") if evaluate else ("train",)
    eval_samples = args.eval_iters * gbs if evaluate else None
    try:
        train_ds, valid_ds, _ = build_split_datasets(
            args, (needed, eval_samples, None), splits,
            vocab_size=vocab_size)
    except OSError as e:
        raise ArgumentError(f"--data-cache-path: {e}") from None
    except ValueError as e:
        raise ArgumentError(f"--data-path / --split: {e}") from None
    if train_ds is None:
        raise ArgumentError(f"--split {args.split} leaves no training documents")
    check_enough_samples(args, len(train_ds), consumed_samples, needed)
    if valid_ds is not None and evaluate and len(valid_ds) < eval_samples:
        raise ArgumentError(f"{data_description(args)}: the validation split holds "
                            f"{len(valid_ds)} samples but --eval-iters {args.eval_iters} x --global-batch-size "
                            f"{gbs} needs {eval_samples}; lower --eval-iters or give the split more weight")
    return _data_iterators(args, train_ds, valid_ds if evaluate else None, dp_rank, dp_size)


def build_mock_data(args, vocab_size, dp_rank, dp_size, consumed_samples=0):
    """--mock-data: (make_train_iterator, make_valid_iterator or None) over synthetic samples, as
    many as the run needs, deterministic from --seed (megaphi.data.mock_dataset)."""
    from megaphi.data.mock_dataset import MockGPTDataset

    gbs = args.global_batch_size
    train_ds = MockGPTDataset(max(args.train_iters * gbs, consumed_samples), args.seq_length, vocab_size, args.seed)
    valid_ds = None
    if evaluation_enabled(args):
        valid_ds = MockGPTDataset(args.eval_iters * gbs, args.seq_length, vocab_size, args.seed, split="valid")
    return _data_iterators(args, train_ds, valid_ds, dp_rank, dp_size)


def _data_iterators(args, train_ds, valid_ds, dp_rank, dp_size):
    from megaphi.data import build_pretraining_data_loader

    def make_train_iterator(consumed_samples):
        return _iterate(build_pretraining_data_loader(train_ds, consumed_samples, args.micro_batch_size,
                                                      dp_rank, dp_size, num_workers=args.num_workers))

    def make_valid_iterator():
        return _iterate(build_pretraining_data_loader(valid_ds, 0, args.micro_batch_size, dp_rank, dp_size,
                                                      num_workers=0))
    return make_train_iterator, (make_valid_iterator if valid_ds is not None else None)


def check_enough_samples(args, available, consumed_samples, needed):
    """Fail before training, not with a StopIteration mid-run. Several unweighted prefixes are
    blended one epoch each (Megatron's semantics), so they can hold fewer samples than the run needs."""
    data = data_description(args)
    if consumed_samples > available:
        raise ArgumentError(f"{data}: the checkpoint has consumed {consumed_samples} samples but the "
                            f"training data built for --train-iters {args.train_iters} x --global-batch-size "
                            f"{args.global_batch_size} holds only {available}; resume with a --train-iters beyond "
                            f"the checkpoint's iteration and the data it was trained on")
    if available < needed:
        hint = (" (unweighted prefixes are used one epoch each; give weights, e.g. --data-path 1 A 1 B, to "
                "repeat them)" if len(args.data_prefixes) > 1 and args.data_weights is None else "")
        raise ArgumentError(f"{data}: the training data holds {available} samples but --train-iters "
                            f"{args.train_iters} x --global-batch-size {args.global_batch_size} needs {needed}"
                            f"{hint}")


def setup_engine(args, model, ds_config):
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    # DeepSpeed's INFO lines (config dumps, timers) drown the training log; megaphi prints its own.
    ds_logger.setLevel(os.environ.get("MEGAPHI_DEEPSPEED_LOG_LEVEL", "WARNING").upper())

    from megaphi.parallel import mpu
    from megaphi.training.deepspeed_comm import skip_shm_comm_extension
    from megaphi.training.lr_schedule import WarmupDecayLR
    from megaphi.training.optimizer import build_optimizer

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    optimizer = build_optimizer(model, args.lr, args.weight_decay, (args.adam_beta1, args.adam_beta2),
                                args.adam_eps, device_type=device_type, impl=args.optimizer_impl)
    scheduler = WarmupDecayLR(optimizer, args.lr, args.min_lr, args.lr_warmup_iters, args.lr_decay_iters,
                              args.lr_decay_style)
    skip_shm_comm_extension()  # DeepSpeed's CPU comm extension: a JIT build megaphi does not need
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           mpu=mpu, config=ds_config, dist_init_required=False)
    finish_engine_setup(engine)
    return engine


def finish_engine_setup(engine):
    """Small fixes on a fresh engine: log the fp32 grad norm; skip the engine's gradient all-reduce
    when there is a single data-parallel rank.

    The engine all-reduces (engine.allreduce_gradients -> buffered_allreduce_fallback) the module's
    gradients at ZeRO 0 (fp32, fp16; bf16 at ZeRO 0 is left as it was) and, for bf16 at ZeRO 1 with fp32 accumulation (megaphi's bf16 default), the
    BF16 optimizer's flat fp32 gradient buffers: over one rank that only flattens the gradient into a
    bucket of up to 500M elements (2 GB in fp32), "reduces" it and copies it back, ~4 passes over the
    fp32 gradient per step. The BF16 optimizer accumulates its fp32 gradients before the flag is read
    (engine._backward_epilogue), so turning the flag off skips the reduction only. The ZeRO optimizers
    (stages 1-3 otherwise) move gradients into their partitions inside their reduction: not touched."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from megaphi.parallel import get_data_parallel_world_size

    record_fp32_grad_norm(engine)
    fp32_fp16_zero0 = engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    if (fp32_fp16_zero0 or isinstance(engine.optimizer, BF16_Optimizer)) and get_data_parallel_world_size() == 1:
        engine.enable_backward_allreduce = False


def record_fp32_grad_norm(engine):
    """Without ZeRO/fp16/bf16 DeepSpeed computes no grad norm of its own: with clipping it clips with
    a helper whose norm it discards, without clipping it computes none. Keep (or compute) the norm
    so it can be logged; the clipping itself is unchanged."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_record():
        # kept as a tensor: read at the next log, not per step (a device sync on a GPU)
        engine.megaphi_grad_norm = clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(),
                                                   mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record
    take_model_step = engine._take_model_step

    def take_model_step_with_norm(*args, **kwargs):
        if engine.gradient_clipping() <= 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled()
                                                    or engine.zero_optimization()):
            engine.megaphi_grad_norm = global_grad_norm(engine.module.parameters())
        return take_model_step(*args, **kwargs)

    engine._take_model_step = take_model_step_with_norm


def global_grad_norm(parameters):
    """L2 norm of the whole model's gradient (gradients already reduced over data parallel). A
    parameter marked tensor_model_parallel holds a different shard on each TP rank and is summed over
    the TP group; a replicated one is counted once (from TP rank 0), as DeepSpeed counts them.
    Returns a 0-dim tensor where the gradients live: read it at log time."""
    from megaphi.parallel import get_tensor_model_parallel_group, get_tensor_model_parallel_rank

    tp_rank = get_tensor_model_parallel_rank()
    squares = [p.grad.detach().float().pow(2).sum() for p in parameters if p.grad is not None
               and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    group = get_tensor_model_parallel_group()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        if dist.get_backend(group) == "nccl":
            total = total.cuda()
        dist.all_reduce(total, group=group)
    return total.sqrt()


def check_precision_supported(args):
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if args.fp16 and not accelerator.is_fp16_supported():
        raise ArgumentError(f"--fp16: DeepSpeed does not support fp16 on this device "
                            f"({accelerator.device_name()}); use --bf16 or fp32")
    if args.bf16 and not accelerator.is_bf16_supported():
        raise ArgumentError(f"--bf16: not supported on this device ({accelerator.device_name()}); use --fp16 or fp32")


def main(argv=None):
    from megaphi.checkpoint.reshard import TensorParallelMismatchError

    try:
        args = parse_args(argv)
    except ArgumentError as e:
        print(f"megaphi.pretrain: error: {e}", file=sys.stderr)
        return 2
    args.start_time = time.time()  # --exit-duration-in-mins counts from here
    launcher_watch.arm()  # under a launcher: stop (and save) when it goes away
    peers = []
    try:
        init_distributed(args.distributed_backend, args.distributed_timeout_minutes)
        peers = peer_loss.record_peers()
        return run(args)
    except (ArgumentError, TrainingError, layout.CheckpointError, TensorParallelMismatchError) as e:
        print(f"megaphi.pretrain: error: {e}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"megaphi.pretrain: error: disk full (ENOSPC): {e.strerror}: {e.filename or ''}", file=sys.stderr,
              flush=True)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without the save the first one asked for
        print("megaphi.pretrain: error: interrupted by a second Ctrl-C; stopped without saving (a save in "
              "progress is left incomplete and never counts as a checkpoint; 'latest' is unchanged)",
              file=sys.stderr, flush=True)
        return 130
    except RuntimeError as e:
        rank = dist.get_rank() if dist.is_initialized() else None
        if dist_timeout.is_timeout(e):
            message = dist_timeout.timeout_message(e, args.distributed_timeout_minutes, rank)
        elif peer_loss.is_peer_lost(e) and rank is not None:
            message = peer_loss.peer_lost_message(e, peers, rank, args.save)
        else:
            raise
        print(f"megaphi.pretrain: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # the group is unusable: tearing it down could wait on the missing rank again
    finally:
        from megaphi.parallel import destroy_model_parallel
        destroy_model_parallel()
        lock.release_all()
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args):
    import megaphi.ops as ops
    from megaphi.model import PhiForCausalLM, apply_runtime
    from megaphi.parallel.layers import set_grad_communication_overlap
    from megaphi.parallel import get_data_parallel_group, get_data_parallel_rank, get_data_parallel_world_size
    from megaphi.parallel import initialize_model_parallel

    deepspeed_logs_to_stderr()  # before anything imports DeepSpeed: its log lines are not results
    warn_elastic_store(say_rank0)
    if args.save:
        check_save_folder(args.save)  # every host can write it and sees the same folder, before anything else
        lock.acquire_for_job(args.save)  # one job per --save folder, before anything reads it
    initialize_model_parallel(args.tensor_model_parallel_size)
    if hasattr(ops, "set_impl"):
        ops.set_impl(layernorm=args.layernorm_impl, rotary=args.rotary_impl)
    tokenizer = None
    padded_vocab = args.vocab_size
    if args.tokenizer or getattr(args, "vocab_file", None):
        tokenizer = load_run_tokenizer(args)
        padded_vocab = model_vocab_size(args, tokenizer)
    if args.skip_train:
        args.finetune = True  # load the weights only (a checkpoint or a model folder), as finetuning does
    if args.finetune and args.save and layout.read_pointer(args.save) is not None:
        # a restarted finetuning job: continue its own checkpoints rather than start over
        print_rank0(f"--finetune: {args.save} already holds a checkpoint; resuming it instead of loading {args.load}")
        args.finetune, args.load = False, args.save
    # verify the checkpoint (checksums, metadata) and adopt what may be adopted, before building anything
    verified, padded_vocab = resume_checks.prepare_resume(args, tokenizer, padded_vocab, say=say_rank0)
    set_seed(args.seed)
    model_config = build_model_config(args, padded_vocab)
    model = PhiForCausalLM(model_config)  # plain until its weights are in; the runtime comes below
    if args.finetune:
        kind, source = model_folder.finetune_weights_source(args.load)
        if kind == "folder":
            model_folder.load_weights_from_folder(model, source)
            print_rank0(f"{'evaluating the' if args.skip_train else 'finetuning from'} weights in {source}")

    check_precision_supported(args)
    set_grad_communication_overlap(model, args.async_tensor_model_parallel_allreduce)
    apply_runtime(model, build_model_runtime(args))  # compiled blocks: lazily at the first step, names unchanged
    num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    ds_config = build_deepspeed_config(args)
    if "bf16" in args.zero_stage_source:
        print_rank0(f"ZeRO stage {args.zero_stage} ({args.zero_stage_source}): DeepSpeed accumulates and reduces "
                    f"bf16 gradients in fp32 only with ZeRO >= 1 (one data-parallel rank partitions nothing)")
    if verified is not None:  # ZeRO stage, DP size, architecture, lr schedule vs the checkpoint's
        resume_checks.check_resume_setup(args, verified[1], model_config, args.zero_stage, args.load)
    engine = setup_engine(args, model, ds_config)
    state = TrainState()
    if args.finetune:
        if kind == "deepspeed":
            training_state.check_checkpoint_tensor_parallel_size(args.load, source)
            path, _ = engine.load_checkpoint(args.load, tag=source, load_module_only=True,
                                             load_optimizer_states=False, load_lr_scheduler_states=False)
            if path is None:
                raise TrainingError(f"could not load weights from {os.path.join(args.load, source)}")
            print_rank0(f"{'evaluating the' if args.skip_train else 'finetuning from'} weights in "
                        f"{os.path.join(args.load, source)}")
    elif args.load:
        meta = training_state.load_checkpoint(engine, args.load, verified, load_optim=not args.no_load_optim,
                                             load_rng=not args.no_load_rng)
        if meta is None:
            print_rank0(f"no checkpoint in {args.load} (no 'latest' file): starting from scratch")
        else:
            saved = meta.get("state", {})
            state = TrainState(iteration=meta["iteration"], consumed_samples=meta["consumed_samples"],
                               consumed_tokens=meta["consumed_tokens"],
                               best_val_loss=saved.get("best_val_loss") if saved.get("best_val_loss") is not None
                               else math.inf,
                               best_iteration=saved.get("best_iteration", -1),
                               best_pass_at_1=saved.get("best_pass_at_1", -1.0),
                               last_saved_iteration=meta["iteration"])
            print_rank0(f"resumed from {args.load}/{meta['tag']} at iteration {state.iteration} "
                        f"({state.consumed_samples} samples consumed)")

    dp_rank, dp_size = get_data_parallel_rank(), get_data_parallel_world_size()
    if args.skip_train:
        from megaphi.training.eval_only import run_eval_only
        vocab = tokenizer.vocab_size if tokenizer is not None and args.mock_data else model_config.vocab_size
        run_eval_only(args, engine, vocab, dp_rank, dp_size, get_data_parallel_group())
        return 0
    if args.mock_data:
        mock_vocab = tokenizer.vocab_size if tokenizer is not None else model_config.vocab_size
        make_train_iterator, make_valid_iterator = build_mock_data(args, mock_vocab, dp_rank, dp_size,
                                                                   state.consumed_samples)
        print_rank0(f"--mock-data: synthetic tokens (vocabulary {mock_vocab}, seed {args.seed}), no dataset read")
    else:
        make_train_iterator, make_valid_iterator = build_data(args, dp_rank, dp_size, state.consumed_samples,
                                                              vocab_size=model_config.vocab_size)
    train_iterator = make_train_iterator(state.consumed_samples)
    log_run_setup(args, engine, model_config)
    print_rank0(f"training: {num_params:,} parameters (per TP rank), "
                f"world {args.world_size} (TP {args.tensor_model_parallel_size} x DP {dp_size}), "
                f"global batch {args.global_batch_size} = micro {args.micro_batch_size} x DP {dp_size} x "
                f"accumulation {args.gradient_accumulation_steps}, ZeRO stage {args.zero_stage} "
                f"({args.zero_stage_source}), gradient clipping {args.clip_grad:g} "
                f"({getattr(args, 'clip_grad_source', '--clip-grad' if args.clip_grad_given else 'default')}), "
                f"{'fp16' if args.fp16 else 'bf16' if args.bf16 else 'fp32'}")
    writer = open_metrics_writer(args, enabled=dist.get_rank() == 0)
    try:
        with GracefulExit() as stop_signal:
            reason = train(args, engine, train_iterator, make_valid_iterator, state, writer, model_config,
                           tokenizer=tokenizer, stop_signal=stop_signal, dp_group=get_data_parallel_group())
    finally:
        writer.close()
    print_rank0(f"finished ({reason}) at iteration {state.iteration}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""class Trainer: one training (or evaluation) run, built from a RunConfig.

    config = resolve_config(parse_flags(argv))      # megaphi.training.config
    with Trainer(config) as trainer:                # process group, data, model, DeepSpeed engine, resume
        trainer.train()                             # until --train-iters, --exit-interval or a signal

`__init__` builds everything; `train_step` runs one optimizer step through the schedule (any function
with the signature of schedules.forward_backward_no_pipelining: the micro-batches of one global batch
on this rank, gradient accumulation, engine.step on the boundary); `train`, `evaluate`, `save` and
`load` do what they say. The step count, data position and best checkpoint live in `trainer.state`.
At --pipeline-model-parallel-size > 1 the engine is pipeline_trainer.PipelineEngine (this rank's stage)
and the schedule pipeline_trainer.pipelined_train_step.
"""

import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megaphi.checkpoint import layout, lock, model_folder, resume_checks, training_state
from megaphi.training import metrics, step_log
from megaphi.training.engine import build_engine, check_precision_supported
from megaphi.training.messages import deepspeed_logs_to_stderr, say_rank0
from megaphi.training.multinode import SaveTimer, check_save_folder, warn_elastic_store
from megaphi.training.process_group import init_distributed
from megaphi.training.schedules import forward_backward_no_pipelining, reduce_loss_tensors
from megaphi.training.train_loop import (
    PendingLosses,
    TrainingError,
    TrainingStopwatch,
    TrainState,
    cpu_control_group,
    check_replicated,
    choose_best,
    count_loss_tokens,
    duration_exceeded,
    evaluate,
    humaneval_pass_at_1,
    make_forward_step,
    print_rank0,
)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step. loss and grad_norm stay where they were computed (read them at log time)."""

    iteration: int
    loss: torch.Tensor  # mean token loss of the global batch (0-dim, on the device)
    lr: float  # the lr the step's update used
    grad_norm: Optional[Any]  # before clipping: float or 0-dim tensor; None when unknown


def set_seed(seed):
    from megaphi.parallel.random import model_parallel_seed

    random.seed(seed)
    np.random.seed(seed)
    model_parallel_seed(seed)  # torch default stream + the tensor-parallel stream


class Trainer:
    def __init__(self, config, schedule=forward_backward_no_pipelining, build_model=None):
        """config: a RunConfig. schedule: runs one step's micro-batches (see the module docstring).
        build_model(PhiConfig) -> the module to train (default: PhiForCausalLM(PhiConfig))."""
        try:
            self._build(config, schedule, build_model)
        except BaseException:
            self.close()  # a half-built run gives back the --save lock and the model-parallel groups
            raise

    def _build(self, config, schedule, build_model):
        import megaphi.ops as ops
        from megaphi.parallel import (
            get_data_parallel_group,
            get_data_parallel_rank,
            get_data_parallel_world_size,
            initialize_model_parallel,
        )
        from megaphi.training.model_flags import load_run_tokenizer

        self.config, self.schedule = config, schedule
        c, ckpt = config, config.checkpoint
        init_distributed(c.parallel.distributed_backend, c.parallel.distributed_timeout_minutes)
        deepspeed_logs_to_stderr()  # before anything imports DeepSpeed: its log lines are not results
        warn_elastic_store(say_rank0)
        if ckpt.save:
            check_save_folder(ckpt.save)  # every host can write it and sees the same folder, before anything else
            lock.acquire_for_job(ckpt.save)  # one job per --save folder, before anything reads it
        initialize_model_parallel(c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size)
        if hasattr(ops, "set_impl"):
            ops.set_impl(layernorm=c.runtime.layernorm_impl, rotary=c.runtime.rotary_impl)
        flags = c.flag_namespace()
        self.tokenizer = load_run_tokenizer(flags) if c.data.tokenizer or c.data.vocab_file else None
        for line in c.logging.messages:
            say_rank0(line)
        # verify the checkpoint (checksums, metadata) before building anything
        self._verified = resume_checks.prepare_resume(flags, say=say_rank0)
        resumed_tag = self._verified[0] if self._verified else None
        if resumed_tag != ckpt.resume_tag:
            raise layout.CheckpointError(
                f"--load {ckpt.load}: 'latest' changed while the run started "
                f"({ckpt.resume_tag} -> {resumed_tag}); start it again"
            )
        set_seed(c.training.seed)
        self.model_config = c.phi_config()
        if c.parallel.pipeline_model_parallel_size > 1:
            self._build_pipeline_stage()
        else:
            self._build_engine(build_model)
        self.state = TrainState()
        self.load()
        self.dp_group = get_data_parallel_group()
        self.dp_rank, self.dp_size = get_data_parallel_rank(), get_data_parallel_world_size()
        self.forward_step = make_forward_step(next(self.engine.module.parameters()).device)
        self.make_train_iterator = self.make_valid_iterator = None
        if not c.training.skip_train:
            self._build_data()

    def _build_engine(self, build_model):
        """P = 1: the whole model in a DeepSpeed engine."""
        from megaphi.model import PhiForCausalLM, apply_runtime
        from megaphi.parallel.layers import set_grad_communication_overlap

        c, ckpt, flags = self.config, self.config.checkpoint, self.config.flag_namespace()
        model = (build_model or PhiForCausalLM)(self.model_config)
        self._finetune_source = model_folder.finetune_weights_source(ckpt.load) if ckpt.finetune else None
        if self._finetune_source and self._finetune_source[0] == "folder":
            model_folder.load_weights_from_folder(model, self._finetune_source[1])
            print_rank0(f"{self._weights_verb()} weights in {self._finetune_source[1]}")
        check_precision_supported(c.optimizer.fp16, c.optimizer.bf16)
        set_grad_communication_overlap(model, c.runtime.async_tensor_model_parallel_allreduce)
        if isinstance(model, PhiForCausalLM):  # a custom build_model runs as it was built
            apply_runtime(model, c.model_runtime())  # compiled blocks: lazily at the first step, names unchanged
        self.num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        if self._verified is not None:  # ZeRO stage, DP size, architecture, lr schedule vs the checkpoint's
            resume_checks.check_resume_setup(
                flags, self._verified[1], self.model_config, c.parallel.zero_stage, ckpt.load
            )
        self.engine, self.grad_norms = build_engine(model, c)

    def _build_pipeline_stage(self):
        """P > 1: this rank's stage chunks, their optimizer and the pipeline schedule (pipeline_trainer)."""
        from megaphi.training.pipeline_trainer import build_pipeline_engine, pipelined_train_step

        c = self.config
        if self._verified is not None:
            resume_checks.check_resume_setup(
                c.flag_namespace(), self._verified[1], self.model_config, c.parallel.zero_stage, c.checkpoint.load
            )
        self.engine, self.num_params, self._finetune_source = build_pipeline_engine(c, self.model_config)
        self.grad_norms, self.schedule = self.engine, pipelined_train_step

    def _weights_verb(self):
        return "evaluating the" if self.config.training.skip_train else "finetuning from"

    def _data_vocab(self):
        """Token ids synthetic data draws from: the tokenizer's (mock data), else the model's rows."""
        if self.tokenizer is not None and self.config.data.mock_data:
            return self.tokenizer.vocab_size
        return self.model_config.vocab_size

    def _build_data(self):
        from megaphi.training.data_sources import build_data, build_mock_data

        c, consumed = self.config, self.state.consumed_samples
        if c.data.mock_data:
            vocab = self._data_vocab()
            self.make_train_iterator, self.make_valid_iterator = build_mock_data(
                c, vocab, self.dp_rank, self.dp_size, consumed
            )
            print_rank0(f"--mock-data: synthetic tokens (vocabulary {vocab}, seed {c.training.seed}), no dataset read")
        else:
            self.make_train_iterator, self.make_valid_iterator = build_data(
                c, self.dp_rank, self.dp_size, consumed, vocab_size=self.model_config.vocab_size
            )

    def load(self):
        """Finetuning: the weights of --load's checkpoint (a model folder's are read before the engine
        exists). Resuming: weights, optimizer, lr schedule, RNG and data position of --load's `latest`,
        into `self.state`. Nothing to load: a fresh start."""
        ckpt = self.config.checkpoint
        if ckpt.finetune:
            kind, source = self._finetune_source
            if kind == "deepspeed":
                training_state.check_checkpoint_tensor_parallel_size(ckpt.load, source)
                path, _ = self.engine.load_checkpoint(
                    ckpt.load,
                    tag=source,
                    load_module_only=True,
                    load_optimizer_states=False,
                    load_lr_scheduler_states=False,
                )
                if path is None:
                    raise TrainingError(f"could not load weights from {os.path.join(ckpt.load, source)}")
                print_rank0(f"{self._weights_verb()} weights in {os.path.join(ckpt.load, source)}")
            return
        if not ckpt.load:
            return
        meta = training_state.load_checkpoint(
            self.engine, ckpt.load, self._verified, load_optim=not ckpt.no_load_optim, load_rng=not ckpt.no_load_rng
        )
        if meta is None:
            print_rank0(f"no checkpoint in {ckpt.load} (no 'latest' file): starting from scratch")
            return
        saved = meta.get("state", {})
        best_val_loss = saved.get("best_val_loss")
        self.state = TrainState(
            iteration=meta["iteration"],
            consumed_samples=meta["consumed_samples"],
            consumed_tokens=meta["consumed_tokens"],
            best_val_loss=math.inf if best_val_loss is None else best_val_loss,
            best_iteration=saved.get("best_iteration", -1),
            best_pass_at_1=saved.get("best_pass_at_1", -1.0),
            last_saved_iteration=meta["iteration"],
        )
        print_rank0(
            f"resumed from {ckpt.load}/{meta['tag']} at iteration {self.state.iteration} "
            f"({self.state.consumed_samples} samples consumed)"
        )

    def train_step(self, data_iterator):
        """One optimizer step over the next global batch; advances `self.state`. No host sync."""
        t = self.config.training
        lr = self.engine.lr_scheduler.get_lr()[0]  # the lr this iteration's update uses
        logs = self.schedule(
            self.forward_step,
            data_iterator,
            self.engine,
            t.gradient_accumulation_steps,
            count_tokens_func=count_loss_tokens,
            dp_group=self.dp_group,
        )
        self.state.iteration += 1
        self.state.consumed_samples += t.global_batch_size
        self.state.consumed_tokens += t.global_batch_size * t.seq_length
        return StepResult(
            self.state.iteration, reduce_loss_tensors(logs, self.dp_group)["lm loss"], lr, self.grad_norms.latest()
        )

    def evaluate(self):
        """Validation loss over the first --eval-iters global batches of the validation split (the same
        batches every time); None without a validation split. --skip-train runs: see train()."""
        if self.make_valid_iterator is None:
            return None
        from megaphi.training.pipeline_trainer import pipelined_evaluate

        pipelined = self.config.parallel.pipeline_model_parallel_size > 1
        return (pipelined_evaluate if pipelined else evaluate)(
            self.engine,
            self.forward_step,
            self.make_valid_iterator,
            self.config.eval.eval_iters,
            self.config.training.gradient_accumulation_steps,
            self.dp_group,
        )

    def save(self, val_loss=None, pass_at_1=None):
        """Collective: a checkpoint of the current state into --save (marked best when it is); its tag."""
        c = self.config
        tp = c.parallel.tensor_model_parallel_size
        check_replicated(self.engine.module, tp, f" at iteration {self.state.iteration}, before saving")
        best = choose_best(self.state, val_loss, pass_at_1, by_humaneval=bool(c.eval.eval_humaneval))
        tag = training_state.save_checkpoint(
            self.engine,
            c.checkpoint.save,
            self.state.iteration,
            self.state.consumed_samples,
            self.state.consumed_tokens,
            c.flag_namespace(),
            state={
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self.state).items()
                if k != "last_saved_iteration"
            },
            export_model=not c.checkpoint.no_export_model,
            is_best=best is not None,
            tokenizer=self.tokenizer,
            best_metric=best,
        )
        self.state.last_saved_iteration = self.state.iteration
        print_rank0(f"saved checkpoint {c.checkpoint.save}/{tag}" + (f" (best so far: {best})" if best else ""))
        return tag

    def close(self):
        """Give back what the run holds in this process: the model-parallel groups and the --save lock
        (the process group stays, for a next Trainer)."""
        from megaphi.parallel import destroy_model_parallel

        destroy_model_parallel()
        lock.release_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def train(self, stop_signal=None):
        """Train until --train-iters (or --exit-interval, --exit-duration-in-mins, a stop signal); a
        --skip-train run evaluates instead. Returns why it stopped: done, signal, exit-interval,
        exit-duration, or evaluated."""
        from megaphi.training.run_info import log_run_setup, training_summary
        from megaphi.training.signals import GracefulExit

        c = self.config
        if c.training.skip_train:
            from megaphi.training.eval_only import run_eval_only

            run_eval_only(c, self.engine, self._data_vocab(), self.dp_rank, self.dp_size, self.dp_group)
            return "evaluated"
        train_iterator = self.make_train_iterator(self.state.consumed_samples)
        log_run_setup(c, self.engine, self.model_config)
        print_rank0(training_summary(c, self.num_params, self.dp_size))
        writer = metrics.open_metrics_writer(c.flag_namespace(), enabled=dist.get_rank() == 0)
        try:
            if stop_signal is not None:
                reason = self._loop(train_iterator, writer, stop_signal)
            else:
                with GracefulExit() as signal_watch:
                    reason = self._loop(train_iterator, writer, signal_watch)
        finally:
            writer.close()
        print_rank0(f"finished ({reason}) at iteration {self.state.iteration}")
        return reason

    def _loop(self, train_iterator, writer, stop_signal):
        c, state = self.config, self.state
        t, tp = c.training, c.parallel.tensor_model_parallel_size
        flops_token = metrics.flops_per_token(
            self.model_config.num_hidden_layers,
            self.model_config.hidden_size,
            self.model_config.intermediate_size,
            self.model_config.vocab_size,
            t.seq_length,
        )
        self.engine.train()
        control_group = cpu_control_group()
        save_timer = SaveTimer(c.checkpoint.save_interval_minutes)  # --save-interval-minutes
        pending = PendingLosses(c.optimizer.fp16)
        watch = TrainingStopwatch(next(self.engine.module.parameters()).device)  # evaluation and saves paused out
        interval_iters, skipped_before = 0, self.engine.skipped_steps
        first_iteration = state.iteration + 1  # logged whatever --log-interval is: the first line comes soon
        check_every = c.parallel.check_replicated_params
        if check_every:
            check_replicated(self.engine.module, tp, f" at start (iteration {state.iteration})")
        while state.iteration < t.train_iters:
            step = self.train_step(train_iterator)
            pending.add(step.iteration, step.loss)  # on the device until the next log, save or evaluation
            interval_iters += 1
            if check_every and state.iteration % check_every == 0:
                check_replicated(self.engine.module, tp, f" after iteration {state.iteration}")
            if state.iteration % c.logging.log_interval == 0 or state.iteration in (t.train_iters, first_iteration):
                interval_loss = pending.flush()
                step_log.log_step(
                    self, step, interval_loss, interval_iters, watch.take(), skipped_before, flops_token, writer
                )
                interval_iters, skipped_before = 0, self.engine.skipped_steps
            elif c.logging.tensorboard_log_interval and state.iteration % c.logging.tensorboard_log_interval == 0:
                step_log.write_scalars(self, step, writer)  # TensorBoard between log lines

            val_loss = None
            if (
                c.eval.eval_iters > 0
                and self.make_valid_iterator is not None
                and (state.iteration % c.eval.eval_interval == 0 or state.iteration == t.train_iters)
            ):
                watch.pause()
                pending.check()
                val_loss = self.evaluate()
                val_ppl = math.exp(min(val_loss, 50.0))
                print_rank0(f"validation at iteration {state.iteration} | lm loss {val_loss:.6f} | ppl {val_ppl:.3f}")
                writer.write(
                    {
                        "iteration": state.iteration,
                        "consumed_samples": state.consumed_samples,
                        "val_loss": val_loss,
                        "val_ppl": val_ppl,
                    },
                    prefix="valid",
                )

            pass_at_1 = None
            if c.eval.eval_humaneval and state.iteration % c.eval.eval_humaneval_interval == 0:
                watch.pause()
                pending.check()
                pass_at_1 = humaneval_pass_at_1(
                    self.engine,
                    self.tokenizer,
                    c.eval.eval_humaneval,
                    c.eval.humaneval_max_new_tokens,
                    c.parallel.zero_stage,
                    tp,
                )
                if pass_at_1 is not None:
                    print_rank0(f"HumanEval at iteration {state.iteration} | pass@1 {pass_at_1:.4f}")
                    writer.write({"iteration": state.iteration, "humaneval_pass@1": pass_at_1}, prefix="humaneval")

            # the stop decision is taken over the whole world, so every rank saves; on a CPU group, so
            # taking it does not wait for the GPU
            stop = stop_signal is not None and stop_signal.should_stop(control_group, torch.device("cpu"))
            exit_now = t.exit_interval is not None and state.iteration % t.exit_interval == 0
            out_of_time = duration_exceeded(t.exit_duration_in_mins, t.start_time, control_group)
            save_interval = c.checkpoint.save_interval
            periodic = (
                save_interval is not None and state.iteration % save_interval == 0 or save_timer.due(control_group)
            )
            if c.checkpoint.save and (periodic or stop or exit_now or out_of_time or state.iteration == t.train_iters):
                watch.pause()
                pending.check()  # never save weights that a non-finite loss already reached
                self.save(val_loss, pass_at_1)
            watch.resume()
            if stop:
                what = (
                    f"saved at iteration {state.iteration}"
                    if c.checkpoint.save
                    else f"nothing saved (no --save) at iteration {state.iteration}"
                )
                print_rank0(f"received {stop_signal.signal_name or 'a stop signal'}: {what}, exiting")
                return "signal"
            if exit_now:
                print_rank0(f"--exit-interval {t.exit_interval}: saved at iteration {state.iteration}, exiting")
                return "exit-interval"
            if out_of_time:
                print_rank0(
                    f"--exit-duration-in-mins {t.exit_duration_in_mins:g}: saved at iteration "
                    f"{state.iteration}, exiting"
                )
                return "exit-duration"
        return "done"

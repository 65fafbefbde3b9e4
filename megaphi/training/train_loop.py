"""The train loop: schedule -> engine step -> metrics, evaluation, checkpoints, clean exits."""
import contextlib
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ..model.phi import IGNORE_INDEX  # labels the model leaves out of the loss
from megaphi.checkpoint import rng_state, training_state

from . import metrics
from .schedules import forward_backward_no_pipelining, reduce_loss_dicts, reduce_loss_tensors
from .multinode import SaveTimer


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    best_val_loss: float = math.inf
    best_iteration: int = -1
    best_pass_at_1: float = -1.0  # with --eval-humaneval, the best checkpoint is chosen by HumanEval pass@1
    last_saved_iteration: int = -1


def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def print_rank0(*a):
    if _rank() == 0:
        print(*a, flush=True)




def loss_token_mask(batch):
    """The micro-batch's per-token loss weights (CPU float), or None when every token counts (plain
    pretraining: the loss is then the legacy mean, bit for bit)."""
    labels = batch["labels"]
    valid = labels != IGNORE_INDEX
    loss_mask = batch.get("loss_mask")
    if loss_mask is None:
        return None if bool(valid.all()) else valid.float()
    loss_mask = torch.as_tensor(loss_mask)
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)} but labels {tuple(labels.shape)}")
    return loss_mask.float() * valid


def count_loss_tokens(batch):
    """Number of tokens a micro-batch's loss averages over (the schedule's count_tokens_func)."""
    mask = loss_token_mask(batch)
    return batch["labels"].numel() if mask is None else mask.double().sum().item()


def make_forward_step(device):
    """forward_step_func for the schedule: next micro-batch -> per-token losses -> the token mean
    (no mask) or (masked token-loss sum, token count) for the schedule's global token average."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        mask = loss_token_mask(batch)
        token_losses, _ = model(tokens, labels=labels, reduction="none")

        def loss_func(output):
            output = output.float()
            if mask is None:
                # the mean is backpropagated as before (bit-exact pretraining); the log is always the
                # [sum, count] pair, so every micro-batch and dp rank reduces the same tensor shape
                loss = output.mean()
                num_tokens = output.numel()
                # torch.full fills on the device; torch.tensor(number, device=cuda) would be a blocking copy
                logged = torch.stack([loss.detach().double() * num_tokens,
                                      torch.full((), num_tokens, dtype=torch.float64, device=output.device)])
                return loss, {"lm loss": logged}
            weights = mask.to(output.device, dtype=output.dtype)
            loss_sum = (output * weights).sum()
            num_tokens = weights.sum()
            return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens]).double()}

        return token_losses, loss_func

    return forward_step


def loss_scale_of(engine):
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    for name in ("cur_scale", "loss_scale"):
        value = getattr(opt, name, None)
        if value is not None:
            return float(value() if callable(value) else value)
    return float("nan")


def evaluate(engine, forward_step, make_valid_iterator, eval_iters, num_microbatches, dp_group):
    """Validation loss on the first eval_iters global batches of the validation split (the same
    batches every time, so values are comparable across evaluations and resumes)."""
    engine.eval()
    data = make_valid_iterator()
    logs = []
    try:
        for _ in range(eval_iters):
            logs += forward_backward_no_pipelining(forward_step, data, engine, num_microbatches, forward_only=True)
    finally:
        engine.train()
    return reduce_loss_dicts(logs, dp_group)["lm loss"]


def _humaneval(engine, args, tokenizer):
    from megaphi.evaluation.humaneval import evaluate_model

    saved_rng = rng_state.rng_states()  # generation must not perturb the training RNG streams
    gather = contextlib.nullcontext()
    if args.zero_stage == 3:
        import deepspeed
        gather = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    result = None
    engine.eval()
    try:
        with gather:
            if _rank() == 0 or args.tensor_model_parallel_size > 1:
                result = evaluate_model(engine.module, tokenizer, args.eval_humaneval, num_samples=1, greedy=True,
                                        max_new_tokens=args.humaneval_max_new_tokens)
    finally:
        engine.train()
        rng_state.set_rng_states(saved_rng)
    if dist.is_initialized():
        dist.barrier()
    return result


def train(args, engine, train_iterator, make_valid_iterator, state, writer, model_config, tokenizer=None,
          stop_signal=None, dp_group=None):
    """Run until --train-iters (or --exit-interval / a signal). Returns the reason it stopped."""
    device = next(engine.module.parameters()).device
    forward_step = make_forward_step(device)
    seq = args.seq_length
    flops_token = metrics.flops_per_token(model_config.num_hidden_layers, model_config.hidden_size,
                                          model_config.intermediate_size, model_config.vocab_size, seq)
    peak = args.peak_tflops  # set by run_info.log_run_setup (None: no known peak, MFU n/a)
    tokens_per_iter = args.global_batch_size * seq
    gas = args.gradient_accumulation_steps
    scheduler = engine.lr_scheduler

    engine.train()
    control_group = _control_group()
    save_timer = SaveTimer(getattr(args, "save_interval_minutes", None))  # --save-interval-minutes
    pending = PendingLosses(args.fp16)
    watch = TrainingStopwatch(device)  # step time only: evaluation and saving are paused out
    interval_iters = 0
    skipped_before = engine.skipped_steps
    reason = "done"
    first_iteration = state.iteration + 1  # logged whatever --log-interval is: the first line comes soon
    start_time = getattr(args, "start_time", None) or time.time()  # --exit-duration-in-mins counts from here
    check_every = getattr(args, "check_replicated_params", None)
    if check_every:
        check_replicated(engine, args, f" at start (iteration {state.iteration})")
    while state.iteration < args.train_iters:
        lr = scheduler.get_lr()[0]  # the lr this iteration's update uses
        logs = forward_backward_no_pipelining(forward_step, train_iterator, engine, gas,
                                              count_tokens_func=count_loss_tokens, dp_group=dp_group)
        state.iteration += 1
        # the loss stays on the device until the next log, save or evaluation: no host sync per step
        pending.add(state.iteration, reduce_loss_tensors(logs, dp_group)["lm loss"])
        state.consumed_samples += args.global_batch_size
        state.consumed_tokens += tokens_per_iter
        interval_iters += 1
        if check_every and state.iteration % check_every == 0:
            check_replicated(engine, args, f" after iteration {state.iteration}")

        if state.iteration % args.log_interval == 0 or state.iteration in (args.train_iters, first_iteration):
            interval_loss = pending.flush()
            interval_time = watch.take()
            tok_s, tflops, mfu = metrics.throughput(tokens_per_iter * interval_iters, interval_time, flops_token,
                                                    args.world_size, peak)
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is None:
                grad_norm = getattr(engine, "megaphi_grad_norm", None)
            record = {
                "iteration": state.iteration, "train_iters": args.train_iters,
                "consumed_samples": state.consumed_samples, "consumed_tokens": state.consumed_tokens,
                "loss": interval_loss, "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "loss_scale": loss_scale_of(engine), "skipped_steps": engine.skipped_steps,
                "skipped_in_interval": engine.skipped_steps - skipped_before,
                "ms_per_iter": 1000 * interval_time / interval_iters, "tokens_per_sec": tok_s,
                "tflops_per_gpu": tflops, "mfu": mfu, "peak_memory_gb": metrics.peak_memory_gb(),
                "global_batch_size": args.global_batch_size,
                "eta_seconds": metrics.eta_seconds(state.iteration, args.train_iters, interval_time / interval_iters),
            }
            if getattr(args, "log_params_norm", False):
                record["params_norm"] = metrics.parameters_norm(engine.module.parameters())
            print_rank0(metrics.format_train_line(record))
            writer.write(record)
            interval_iters = 0
            skipped_before = engine.skipped_steps

        val_loss = None
        if args.eval_iters > 0 and make_valid_iterator is not None and (
                state.iteration % args.eval_interval == 0 or state.iteration == args.train_iters):
            watch.pause()
            pending.check()
            val_loss = evaluate(engine, forward_step, make_valid_iterator, args.eval_iters, gas, dp_group)
            val_ppl = math.exp(min(val_loss, 50.0))
            print_rank0(f"validation at iteration {state.iteration} | lm loss {val_loss:.6f} | ppl {val_ppl:.3f}")
            writer.write({"iteration": state.iteration, "consumed_samples": state.consumed_samples,
                          "val_loss": val_loss, "val_ppl": val_ppl}, prefix="valid")

        pass_at_1 = None
        if args.eval_humaneval and state.iteration % args.eval_humaneval_interval == 0:
            watch.pause()
            pending.check()
            result = _humaneval(engine, args, tokenizer)
            if result is not None:
                pass_at_1 = result["pass@1"]
                print_rank0(f"HumanEval at iteration {state.iteration} | pass@1 {result['pass@1']:.4f}")
                writer.write({"iteration": state.iteration, "humaneval_pass@1": result["pass@1"]}, prefix="humaneval")

        # the stop decision is taken over the whole world, so every rank saves; on a CPU group, so
        # taking it does not wait for the GPU
        stop = stop_signal is not None and stop_signal.should_stop(control_group, torch.device("cpu"))
        exit_now = args.exit_interval is not None and state.iteration % args.exit_interval == 0
        out_of_time = duration_exceeded(getattr(args, "exit_duration_in_mins", None), start_time, control_group)
        periodic = args.save_interval is not None and state.iteration % args.save_interval == 0 \
            or save_timer.due(control_group)
        if args.save and (periodic or stop or exit_now or out_of_time or state.iteration == args.train_iters):
            watch.pause()
            pending.check()  # never save weights that a non-finite loss already reached
            save(engine, args, state, val_loss, tokenizer, pass_at_1)
        watch.resume()
        if stop:
            what = f"saved at iteration {state.iteration}" if args.save else \
                f"nothing saved (no --save) at iteration {state.iteration}"
            print_rank0(f"received {stop_signal.signal_name or 'a stop signal'}: {what}, exiting")
            reason = "signal"
            break
        if exit_now:
            print_rank0(f"--exit-interval {args.exit_interval}: saved at iteration {state.iteration}, exiting")
            reason = "exit-interval"
            break
        if out_of_time:
            print_rank0(f"--exit-duration-in-mins {args.exit_duration_in_mins:g}: saved at iteration "
                        f"{state.iteration}, exiting")
            reason = "exit-duration"
            break
    return reason


def duration_exceeded(limit_minutes, start_time, group=None):
    """True on every rank once any rank has run for more than limit_minutes (collective call when a
    limit is set: ranks agree, so they all save and exit at the same iteration)."""
    if limit_minutes is None:
        return False
    flag = torch.tensor([1.0 if (time.time() - start_time) / 60.0 > limit_minutes else 0.0])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CONTROL_GROUPS = {}


def _control_group():
    """A gloo group over all ranks for small control decisions (stop flags) that the host needs now:
    over NCCL each would be a device round trip and a blocking read. None: the default group is
    already a CPU one (or there is no group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "nccl":
        return None
    if "gloo" not in _CONTROL_GROUPS:  # created once, by every rank in the same order
        _CONTROL_GROUPS["gloo"] = dist.new_group(backend="gloo")
    return _CONTROL_GROUPS["gloo"]


class TrainingStopwatch:
    """Wall time of training steps between logs. The GPU is synchronized only where the time is read
    or a pause starts (log intervals, evaluation, saves), never per step."""

    def __init__(self, device):
        self.device = device
        self.elapsed = 0.0
        _synchronize(device)
        self.started = time.perf_counter()

    def pause(self):
        if self.started is not None:
            _synchronize(self.device)
            self.elapsed += time.perf_counter() - self.started
            self.started = None

    def resume(self):
        if self.started is None:
            self.started = time.perf_counter()

    def take(self):
        """Seconds since the last take (pauses excluded); keeps running."""
        self.pause()
        elapsed, self.elapsed = self.elapsed, 0.0
        self.resume()
        return elapsed


class PendingLosses:
    """Per-iteration losses kept as device tensors until they are read, all at once (one host sync
    per log interval). A non-finite loss stops the run naming its iteration, when read: before the
    next log, evaluation or save (fp16 runs skip overflowed steps instead and are not stopped)."""

    def __init__(self, fp16):
        self.fp16 = fp16
        self.iterations, self.losses = [], []
        self.finite_sum, self.finite_count = 0.0, 0

    def add(self, iteration, loss):
        self.iterations.append(iteration)
        self.losses.append(loss.detach().reshape(()))

    def check(self):
        """Read what is pending; raise TrainingError at the first non-finite loss (unless fp16)."""
        if not self.losses:
            return
        values = torch.stack(self.losses).tolist()
        iterations = self.iterations
        self.iterations, self.losses = [], []
        for iteration, loss in zip(iterations, values):
            if not math.isfinite(loss):
                if not self.fp16:
                    raise TrainingError(f"loss is {loss} at iteration {iteration}; stopping. Resume from the last "
                                        f"checkpoint with a lower --lr or more --clip-grad.")
                continue  # an fp16 overflow step is counted in skipped_steps, not averaged in
            self.finite_sum += loss
            self.finite_count += 1

    def flush(self):
        """The mean finite loss since the last flush (nan when none), after check()."""
        self.check()
        mean = self.finite_sum / self.finite_count if self.finite_count else float("nan")
        self.finite_sum, self.finite_count = 0.0, 0
        return mean


def choose_best(state, val_loss=None, pass_at_1=None, by_humaneval=False):
    """Is the checkpoint saved now the best so far? With `by_humaneval` (--eval-humaneval) the
    highest HumanEval pass@1 measured at this iteration wins, as the phi-1 paper keeps the best of
    its saves; otherwise the lowest validation loss. Ties keep the earlier checkpoint. Updates
    `state`; returns the metric that chose it ("humaneval_pass@1 0.312500") or None."""
    if by_humaneval:
        if pass_at_1 is None or not pass_at_1 > state.best_pass_at_1:
            return None
        state.best_pass_at_1, state.best_iteration = pass_at_1, state.iteration
        return f"humaneval_pass@1 {pass_at_1:.6f}"
    if val_loss is None or not val_loss < state.best_val_loss:
        return None
    state.best_val_loss, state.best_iteration = val_loss, state.iteration
    return f"val_loss {val_loss:.6f}"


def check_replicated(engine, args, when):
    """TP > 1: replicated parameters must be bitwise equal on every TP rank (one small all-gather)."""
    if args.tensor_model_parallel_size == 1:
        return
    from ..parallel import get_tensor_model_parallel_group
    from ..parallel.consistency import ReplicatedParameterMismatch, check_replicated_parameters
    try:
        check_replicated_parameters(engine.module, get_tensor_model_parallel_group(), when)
    except ReplicatedParameterMismatch as e:
        raise TrainingError(str(e)) from None


def save(engine, args, state, val_loss=None, tokenizer=None, pass_at_1=None):
    check_replicated(engine, args, f" at iteration {state.iteration}, before saving")  # never save a drifted model
    best = choose_best(state, val_loss, pass_at_1, by_humaneval=bool(args.eval_humaneval))
    tag = training_state.save_checkpoint(
        engine, args.save, state.iteration, state.consumed_samples, state.consumed_tokens, args,
        state={k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in asdict(state).items() if k != "last_saved_iteration"},
        export_model=not args.no_export_model, is_best=best is not None, tokenizer=tokenizer, best_metric=best)
    state.last_saved_iteration = state.iteration
    print_rank0(f"saved checkpoint {args.save}/{tag}" + (f" (best so far: {best})" if best else ""))
    return tag

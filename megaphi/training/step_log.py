"""What the Trainer writes at its log iterations: the printed line, metrics.jsonl and the TensorBoard /
W&B scalars (--log-interval, --tensorboard-log-interval, --log-num-zeros-in-grad, --log-params-norm)."""

from megaphi.training import metrics
from megaphi.training.engine import loss_scale_of
from megaphi.training.train_loop import print_rank0


def step_values(trainer, step):
    """lr, grad norm, loss scale, num_zeros and params_norm (collective over TP) of the last step."""
    logging = trainer.config.logging
    values = {"lr": step.lr, "grad_norm": None if step.grad_norm is None else float(step.grad_norm)}
    values["loss_scale"] = loss_scale_of(trainer.engine)
    if logging.log_num_zeros_in_grad and trainer.grad_norms.latest_zeros() is not None:
        values["num_zeros"] = int(trainer.grad_norms.latest_zeros())
    if logging.log_params_norm:
        values["params_norm"] = metrics.parameters_norm(trainer.engine.module.parameters())
    return values


def log_step(trainer, step, interval_loss, interval_iters, interval_time, skipped_before, flops_token, writer):
    """One log line: printed on rank 0, written to metrics.jsonl, and to the scalars unless
    --tensorboard-log-interval gives them their own iterations."""
    c, state, engine = trainer.config, trainer.state, trainer.engine
    record = metrics.train_record(
        c,
        state,
        step,
        interval_loss,
        interval_iters,
        interval_time,
        flops_token,
        loss_scale_of(engine),
        engine.skipped_steps,
        engine.skipped_steps - skipped_before,
    )
    record.update(step_values(trainer, step))
    print_rank0(metrics.format_train_line(record))
    every = c.logging.tensorboard_log_interval  # None: the scalars go with every log line
    writer.write(record, to_scalars=every is None)
    if every is not None and state.iteration % every == 0:
        writer.write({**record, "loss": float(step.loss)}, to_file=False)  # Megatron's: the iteration's loss


def write_scalars(trainer, step, writer):
    """--tensorboard-log-interval between log lines: this iteration's loss (a host sync), lr, norms and
    batch size to TensorBoard / W&B, as Megatron writes them (timings come with the log lines)."""
    state = trainer.state
    record = {"iteration": state.iteration, "consumed_samples": state.consumed_samples, "loss": float(step.loss)}
    record.update(step_values(trainer, step), global_batch_size=trainer.config.training.global_batch_size)
    writer.write({**record, "peak_memory_gb": metrics.peak_memory_gb()}, to_file=False)

"""--skip-train (alias --eval-only): the validation and test loss and perplexity of the --load weights,
over --eval-iters global batches of each split (the batches training validates on), then exit."""

import math

import torch.distributed as dist

from .argument_error import ArgumentError
from .data_sources import build_split_datasets, data_description
from .metrics import open_metrics_writer
from .train_loop import evaluate, make_forward_step, print_rank0

KEYS = {"valid": ("val_loss", "val_ppl"), "test": ("test_loss", "test_ppl")}


def eval_datasets(config, vocab_size):
    """{split: dataset} for the splits that have data (valid, test)."""
    t, eval_iters = config.training, config.eval.eval_iters
    samples = eval_iters * t.global_batch_size
    if config.data.mock_data:
        from megaphi.data.mock_dataset import MockGPTDataset

        return {"valid": MockGPTDataset(samples, t.seq_length, vocab_size, t.seed, split="valid")}
    try:
        _, valid, test = build_split_datasets(config, (None, samples, samples), splits=("valid", "test"))
    except ValueError as e:
        raise ArgumentError(f"{data_description(config.data)}: {e}") from None
    found = {}
    for name, ds in (("valid", valid), ("test", test)):
        if ds is not None and len(ds) < samples:
            print_rank0(
                f"--skip-train: the {name} split holds {len(ds)} samples, fewer than --eval-iters "
                f"{eval_iters} x --global-batch-size {t.global_batch_size} = {samples}; not evaluated"
            )
        elif ds is not None:
            found[name] = ds
    return found


def run_eval_only(config, engine, vocab_size, dp_rank, dp_size, dp_group=None):
    """Evaluate and log; returns {split: (loss, perplexity)}."""
    from megaphi.data import build_pretraining_data_loader

    t, eval_iters = config.training, config.eval.eval_iters
    datasets = eval_datasets(config, vocab_size)
    if not datasets:
        raise ArgumentError(
            f"--skip-train: {data_description(config.data)} has no validation or test split with "
            f"--eval-iters {eval_iters} x --global-batch-size {t.global_batch_size} samples"
        )
    forward_step = make_forward_step(next(engine.module.parameters()).device)
    evaluate_weights = evaluate
    if config.parallel.pipeline_model_parallel_size > 1:
        from .pipeline_trainer import pipelined_evaluate as evaluate_weights
    writer = open_metrics_writer(config.flag_namespace(), enabled=not dist.is_initialized() or dist.get_rank() == 0)
    results = {}
    try:
        for split, dataset in datasets.items():

            def make_iterator(dataset=dataset):
                return iter(
                    build_pretraining_data_loader(dataset, 0, t.micro_batch_size, dp_rank, dp_size, num_workers=0)
                )

            loss = evaluate_weights(
                engine, forward_step, make_iterator, eval_iters, t.gradient_accumulation_steps, dp_group
            )
            ppl = math.exp(min(loss, 50.0))
            results[split] = (loss, ppl)
            print_rank0(
                f"{split} of {config.checkpoint.load} | lm loss {loss:.6f} | ppl {ppl:.3f} | "
                f"{eval_iters * t.global_batch_size} samples"
            )
            loss_key, ppl_key = KEYS[split]
            writer.write({"iteration": 0, loss_key: loss, ppl_key: ppl}, prefix=split)
    finally:
        writer.close()
    return results

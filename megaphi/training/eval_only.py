"""--skip-train (alias --eval-only): the validation and test loss and perplexity of the --load weights,
over --eval-iters global batches of each split (the batches training validates on), then exit."""
import math

import torch.distributed as dist

from .data_sources import build_split_datasets, data_description
from .metrics import open_metrics_writer
from .train_loop import evaluate, make_forward_step, print_rank0

KEYS = {"valid": ("val_loss", "val_ppl"), "test": ("test_loss", "test_ppl")}


def eval_datasets(args, vocab_size):
    """{split: dataset} for the splits that have data (valid, test)."""
    samples = args.eval_iters * args.global_batch_size
    if args.mock_data:
        from megaphi.data.mock_dataset import MockGPTDataset
        return {"valid": MockGPTDataset(samples, args.seq_length, vocab_size, args.seed, split="valid")}
    try:
        _, valid, test = build_split_datasets(args, (None, samples, samples), splits=("valid", "test"))
    except ValueError as e:
        from .arguments import ArgumentError
        raise ArgumentError(f"{data_description(args)}: {e}") from None
    found = {}
    for name, ds in (("valid", valid), ("test", test)):
        if ds is not None and len(ds) < samples:
            print_rank0(f"--skip-train: the {name} split holds {len(ds)} samples, fewer than --eval-iters "
                        f"{args.eval_iters} x --global-batch-size {args.global_batch_size} = {samples}; not evaluated")
        elif ds is not None:
            found[name] = ds
    return found


def run_eval_only(args, engine, vocab_size, dp_rank, dp_size, dp_group=None):
    """Evaluate and log; returns {split: (loss, perplexity)}."""
    from megaphi.data import build_pretraining_data_loader

    datasets = eval_datasets(args, vocab_size)
    if not datasets:
        from .arguments import ArgumentError
        raise ArgumentError(f"--skip-train: {data_description(args)} has no validation or test split with "
                            f"--eval-iters {args.eval_iters} x --global-batch-size {args.global_batch_size} samples")
    forward_step = make_forward_step(next(engine.module.parameters()).device)
    writer = open_metrics_writer(args, enabled=not dist.is_initialized() or dist.get_rank() == 0)
    results = {}
    try:
        for split, dataset in datasets.items():
            def make_iterator(dataset=dataset):
                return iter(build_pretraining_data_loader(dataset, 0, args.micro_batch_size, dp_rank, dp_size,
                                                          num_workers=0))
            loss = evaluate(engine, forward_step, make_iterator, args.eval_iters, args.gradient_accumulation_steps,
                            dp_group)
            ppl = math.exp(min(loss, 50.0))
            results[split] = (loss, ppl)
            print_rank0(f"{split} of {args.load} | lm loss {loss:.6f} | ppl {ppl:.3f} | "
                        f"{args.eval_iters * args.global_batch_size} samples")
            loss_key, ppl_key = KEYS[split]
            writer.write({"iteration": 0, loss_key: loss, ppl_key: ppl}, prefix=split)
    finally:
        writer.close()
    return results

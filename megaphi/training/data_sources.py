"""A run's data: where its train/valid/test datasets come from (`--data-path` split by `--split`, Megatron's
blend, or Megatron's `--train-data-path` / `--valid-data-path` / `--test-data-path`, each used whole for its
own split), the synthetic tokens of `--mock-data`, and the iterators the trainer reads them through."""

import torch

from .argument_error import ArgumentError
from .megatron_flags import per_split_data_paths

SPLITS = ("train", "valid", "test")


def data_description(data):
    """The flags naming the run's data (a DataConfig, or flags of those names), for messages."""
    per_split = per_split_data_paths(data)
    if not per_split:
        return "--data-path " + " ".join(data.data_path or [])
    return " ".join(f"--{split}-data-path {' '.join(path)}" for split, path in per_split.items())


def build_split_datasets(config, num_samples, splits, **kwargs):
    """(train, valid, test) datasets of a RunConfig, each None when not in `splits` (or not given);
    num_samples and kwargs as for megaphi.data.build_gpt_datasets."""
    from megaphi.data import build_gpt_datasets

    data, seq_length, seed = config.data, config.training.seq_length, config.training.seed
    per_split = per_split_data_paths(data)
    if not per_split:
        return build_gpt_datasets(
            list(data.data_path),
            data.split,
            seq_length,
            seed,
            num_samples=num_samples,
            cache_dir=data.data_cache_path,
            splits=splits,
            **kwargs,
        )
    out = []
    for k, name in enumerate(SPLITS):
        path = per_split.get(name)
        if path is None or name not in splits:
            out.append(None)
            continue
        whole = ",".join("1" if i == k else "0" for i in range(len(SPLITS)))  # every document to this split
        wanted = tuple(num_samples[k] if i == k else None for i in range(len(SPLITS)))
        out.append(
            build_gpt_datasets(
                list(path),
                whole,
                seq_length,
                seed,
                num_samples=wanted,
                cache_dir=data.data_cache_path,
                splits=(name,),
                **kwargs,
            )[k]
        )
    return tuple(out)


def build_data(config, dp_rank, dp_size, consumed_samples=0, vocab_size=None):
    """(make_train_iterator, make_valid_iterator or None). The test split is never read by the
    trainer, so it is not built (a small file may leave it without documents); neither is the
    validation split when evaluation is off. With vocab_size, a token id the model cannot embed
    is an error naming the dataset (megaphi.data.token_check)."""
    t, ev = config.training, config.eval
    gbs = t.global_batch_size
    needed = t.train_iters * gbs
    splits = ("train", "valid") if ev.enabled else ("train",)
    eval_samples = ev.eval_iters * gbs if ev.enabled else None
    try:
        train_ds, valid_ds, _ = build_split_datasets(
            config, (needed, eval_samples, None), splits, vocab_size=vocab_size
        )
    except OSError as e:
        raise ArgumentError(f"--data-cache-path: {e}") from None
    except ValueError as e:
        raise ArgumentError(f"--data-path / --split: {e}") from None
    if train_ds is None:
        raise ArgumentError(f"--split {config.data.split} leaves no training documents")
    check_enough_samples(config, len(train_ds), consumed_samples, needed)
    if valid_ds is not None and ev.enabled and len(valid_ds) < eval_samples:
        raise ArgumentError(
            f"{data_description(config.data)}: the validation split holds "
            f"{len(valid_ds)} samples but --eval-iters {ev.eval_iters} x --global-batch-size "
            f"{gbs} needs {eval_samples}; lower --eval-iters or give the split more weight"
        )
    return data_iterators(config, train_ds, valid_ds if ev.enabled else None, dp_rank, dp_size)


def build_mock_data(config, vocab_size, dp_rank, dp_size, consumed_samples=0):
    """--mock-data: (make_train_iterator, make_valid_iterator or None) over synthetic samples, as
    many as the run needs, deterministic from --seed (megaphi.data.mock_dataset)."""
    from megaphi.data.mock_dataset import MockGPTDataset

    t, ev = config.training, config.eval
    gbs = t.global_batch_size
    train_ds = MockGPTDataset(max(t.train_iters * gbs, consumed_samples), t.seq_length, vocab_size, t.seed)
    valid_ds = None
    if ev.enabled:
        valid_ds = MockGPTDataset(ev.eval_iters * gbs, t.seq_length, vocab_size, t.seed, split="valid")
    return data_iterators(config, train_ds, valid_ds, dp_rank, dp_size)


def _iterate(loader):
    """iter(DataLoader) draws a base seed from torch's default generator; keep that draw from shifting
    the dropout stream, so a resumed run (which makes its iterator at a different point) matches."""
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


def data_iterators(config, train_ds, valid_ds, dp_rank, dp_size):
    """(make_train_iterator(consumed_samples), make_valid_iterator() or None) over the datasets."""
    from megaphi.data import build_pretraining_data_loader

    micro = config.training.micro_batch_size

    def make_train_iterator(consumed_samples):
        return _iterate(
            build_pretraining_data_loader(
                train_ds, consumed_samples, micro, dp_rank, dp_size, num_workers=config.data.num_workers
            )
        )

    def make_valid_iterator():
        return _iterate(build_pretraining_data_loader(valid_ds, 0, micro, dp_rank, dp_size, num_workers=0))

    return make_train_iterator, (make_valid_iterator if valid_ds is not None else None)


def check_enough_samples(config, available, consumed_samples, needed):
    """Fail before training, not with a StopIteration mid-run. Several unweighted prefixes are
    blended one epoch each (Megatron's semantics), so they can hold fewer samples than the run needs."""
    data, t = config.data, config.training
    where = data_description(data)
    if consumed_samples > available:
        raise ArgumentError(
            f"{where}: the checkpoint has consumed {consumed_samples} samples but the "
            f"training data built for --train-iters {t.train_iters} x --global-batch-size "
            f"{t.global_batch_size} holds only {available}; resume with a --train-iters beyond "
            f"the checkpoint's iteration and the data it was trained on"
        )
    if available < needed:
        hint = (
            " (unweighted prefixes are used one epoch each; give weights, e.g. --data-path 1 A 1 B, to repeat them)"
            if len(data.data_prefixes) > 1 and data.data_weights is None
            else ""
        )
        raise ArgumentError(
            f"{where}: the training data holds {available} samples but --train-iters "
            f"{t.train_iters} x --global-batch-size {t.global_batch_size} needs {needed}"
            f"{hint}"
        )

"""Where a run's train/valid/test datasets come from: `--data-path` split by `--split` (Megatron's
blend), or Megatron's `--train-data-path` / `--valid-data-path` / `--test-data-path`, each used whole
for its own split (no --split)."""
from .megatron_flags import per_split_data_paths

SPLITS = ("train", "valid", "test")


def data_description(args):
    """The flags naming the run's data, for messages."""
    per_split = per_split_data_paths(args)
    if not per_split:
        return "--data-path " + " ".join(args.data_path or [])
    return " ".join(f"--{split}-data-path {' '.join(path)}" for split, path in per_split.items())


def build_split_datasets(args, num_samples, splits, **kwargs):
    """(train, valid, test) datasets, each None when not in `splits` (or not given); num_samples and
    kwargs as for megaphi.data.build_gpt_datasets."""
    from megaphi.data import build_gpt_datasets

    per_split = per_split_data_paths(args)
    if not per_split:
        return build_gpt_datasets(args.data_path, args.split, args.seq_length, args.seed, num_samples=num_samples,
                                  cache_dir=args.data_cache_path, splits=splits, **kwargs)
    out = []
    for k, name in enumerate(SPLITS):
        path = per_split.get(name)
        if path is None or name not in splits:
            out.append(None)
            continue
        whole = ",".join("1" if i == k else "0" for i in range(len(SPLITS)))  # every document to this split
        wanted = tuple(num_samples[k] if i == k else None for i in range(len(SPLITS)))
        out.append(build_gpt_datasets(path, whole, args.seq_length, args.seed, num_samples=wanted,
                                      cache_dir=args.data_cache_path, splits=(name,), **kwargs)[k])
    return tuple(out)

"""megaphi.data: token files, Megatron-compatible datasets and the pretraining sampler; the corpus readers
and the preprocessing pipeline (preprocess.py) that make the token files."""

from .blended_dataset import BlendedDataset, build_gpt_datasets, parse_data_path
from .gpt_dataset import GPTDataset, build_gpt_indices
from .indexed_dataset import IndexedDataset, IndexedDatasetBuilder, dtype_for_vocab

_SAMPLER_NAMES = ("MegatronPretrainingSampler", "build_pretraining_data_loader")


def __getattr__(name):
    # The sampler needs torch; importing it lazily keeps `import megaphi.data.indexed_dataset`
    # (e.g. in preprocessing workers) free of torch's import time.
    if name in _SAMPLER_NAMES:
        from . import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BlendedDataset",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "MegatronPretrainingSampler",
    "build_gpt_datasets",
    "build_gpt_indices",
    "build_pretraining_data_loader",
    "dtype_for_vocab",
    "parse_data_path",
]

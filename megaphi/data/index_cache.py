"""On-disk cache of dataset indices: content-keyed file names, atomic writes, rank-0 builds.

A cache entry is `<dir>/<md5>-<Class>-<split>-<name>.npy` plus `...-description.txt`, where md5 is
the hash of a JSON description of every parameter that changes the indices. Each file is written
under a temporary name and renamed, so readers only ever see complete files and concurrent
writers of the same (deterministic) entry are harmless.
"""

import hashlib
import json
import logging
import os
import tempfile
from typing import Callable, Dict, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def describe(identifiers: Mapping) -> tuple:
    """(JSON description, its md5 hex digest)."""
    text = json.dumps(dict(identifiers), indent=4)
    return text, hashlib.md5(text.encode("utf-8")).hexdigest()


def _atomic_write(path: str, write: Callable) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_entry(paths: Mapping[str, str], arrays: Mapping[str, np.ndarray], description: str) -> None:
    """Writes every array, then the description (its presence marks a complete entry)."""
    directory = os.path.dirname(paths["description"]) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        for name, array in arrays.items():
            _atomic_write(paths[name], lambda f, a=array: np.save(f, a, allow_pickle=False))
        _atomic_write(paths["description"], lambda f: f.write(description.encode("utf-8")))
    except OSError as exc:
        raise OSError(
            f"cannot write the dataset index cache in {directory}: {exc}. Pass a writable "
            f"cache_dir (--data-cache-path) or cache=False."
        ) from exc


def entry_complete(paths: Mapping[str, str]) -> bool:
    return all(os.path.isfile(p) for p in paths.values())


def load_entry(paths: Mapping[str, str], names: Sequence[str]) -> Dict[str, np.ndarray]:
    return {name: np.load(paths[name], mmap_mode="r", allow_pickle=False) for name in names}


def _distributed_rank():
    """(rank, barrier) when torch.distributed is initialised, else (None, None)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None, None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.barrier
    return None, None


def build_or_load(
    paths: Mapping[str, str], names: Sequence[str], description: str, build: Callable[[], Dict[str, np.ndarray]]
) -> Dict[str, np.ndarray]:
    """Returns the cached arrays (memory-mapped), building and saving them first when missing.

    With torch.distributed initialised, global rank 0 builds while the other ranks wait at a
    barrier and then map the files; every rank must call this collectively. When a rank still finds
    no entry after the barrier (a cache directory that is not shared between nodes), it builds its
    own copy; the atomic renames make that safe.
    """
    rank, barrier = _distributed_rank()
    if rank is not None:
        error = None
        if rank == 0 and not entry_complete(paths):
            try:
                save_entry(paths, build(), description)
            except BaseException as exc:  # release the other ranks before failing
                error = exc
        barrier()
        if error is not None:
            raise error
    if not entry_complete(paths):
        if rank not in (None, 0):
            logger.warning("index cache %s not visible after rank 0 built it; building locally", paths["description"])
        save_entry(paths, build(), description)
    return load_entry(paths, names)

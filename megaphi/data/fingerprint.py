"""What identifies the contents of a PREFIX.bin/.idx pair, for caches derived from it.

The sample indices are a function of the sequence lengths, which live in the .idx: a SHA-1 of the
whole .idx is therefore an exact key for them (re-preprocessing a prefix with the same document
count and token total but another order changes the lengths' order, hence the hash). The .idx is
small (12 bytes per sequence + 8 per document: about 0.4 GB for 20M documents, hashed at several
hundred MB/s), so it is read in full. The .bin's contents never change the indices; its size (and
the .idx hash) is enough there. Results derived from the .bin's contents (the largest token id)
also key on its size and mtime_ns, since hashing the .bin (GBs) at every start would cost more
than the scan it saves.
"""

import hashlib
import os

_CHUNK = 16 << 20


def file_sha1(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def index_fingerprint(dataset) -> dict:
    """{"idx_sha1", "idx_bytes", "bin_bytes"} of an open IndexedDataset, computed once per reader."""
    cached = getattr(dataset, "_megaphi_index_fingerprint", None)
    if cached is None:
        cached = {
            "idx_sha1": file_sha1(dataset.idx_path),
            "idx_bytes": os.path.getsize(dataset.idx_path),
            "bin_bytes": os.path.getsize(dataset.bin_path),
        }
        dataset._megaphi_index_fingerprint = cached
    return dict(cached)


def data_fingerprint(dataset) -> dict:
    """index_fingerprint plus the .bin's mtime_ns: changes whenever the token file is rewritten."""
    stat = os.stat(dataset.bin_path)
    return dict(index_fingerprint(dataset), bin_mtime_ns=stat.st_mtime_ns)

"""Independent numpy reference for the dataset indices (Megatron-LM GPTDataset / blending semantics).

Written from docs/design.md's "Samples" and "Blending" text with plain loops and searchsorted, sharing no
code with megaphi.data. Also writes MMIDIDX v1 .bin/.idx files byte by byte with struct.
"""

import math
import struct

import numpy as np

DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}


def write_token_files(prefix, documents, dtype=np.uint16):
    """PREFIX.bin / PREFIX.idx with one sequence per document, laid out as docs/design.md's table."""
    dtype = np.dtype(dtype)
    lengths = [len(d) for d in documents]
    with open(prefix + ".bin", "wb") as f:
        for doc in documents:
            f.write(np.asarray(doc, dtype=dtype).tobytes())
    s = len(documents)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", s))
        f.write(struct.pack("<Q", s + 1))
        for n in lengths:
            f.write(struct.pack("<i", n))
        offset = 0
        for n in lengths:
            f.write(struct.pack("<q", offset))
            offset += n * dtype.itemsize
        for d in range(s + 1):
            f.write(struct.pack("<q", d))


def split_range(split, split_name, num_docs):
    weights = [float(x) for x in split.split(",")]
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    fractions = [w / total for w in weights]
    k = ["train", "valid", "test"].index(split_name)
    lo = 0.0  # cumulative sums added one at a time, left to right
    for f in fractions[:k]:
        lo = lo + f
    hi = lo + fractions[k]
    if hi <= lo:
        return None
    return int(round(lo * num_docs)), int(round(hi * num_docs))


def epochs(tokens_per_epoch, num_samples, seq_length):
    e = 1
    while num_samples is not None and e * tokens_per_epoch < num_samples * seq_length + 1:
        e += 1
    return e


def is_separate(tokens_per_epoch, e, num_samples, seq_length):
    if e == 1:
        return False
    per_epoch = (tokens_per_epoch - 1) // seq_length
    before_final = ((e - 1) * tokens_per_epoch - 1) // seq_length
    return (num_samples - before_final) < int(0.8 * per_epoch)


def reference_indices(lengths, split, split_name, seq_length, num_samples, seed):
    """(document_index, sample_index, shuffle_index, info) for docs/design.md's rules."""
    lengths = np.asarray(lengths, dtype=np.int64)
    begin, end = split_range(split, split_name, len(lengths))
    docs = list(range(begin, end))
    tokens_per_epoch = int(sum(lengths[d] for d in docs))
    e = epochs(tokens_per_epoch, num_samples, seq_length)
    separate = is_separate(tokens_per_epoch, e, num_samples, seq_length)
    rng = np.random.RandomState(seed)
    if separate:
        head = np.array(docs * (e - 1), dtype=np.int32)
        rng.shuffle(head)
        tail = np.array(docs, dtype=np.int32)
        rng.shuffle(tail)
        document_index = np.concatenate([head, tail])
    else:
        document_index = np.array(docs * e, dtype=np.int32)
        rng.shuffle(document_index)

    # Sample j starts at stream token j * L; find the document position holding that token.
    n = (e * tokens_per_epoch - 1) // seq_length
    starts = np.zeros(len(document_index) + 1, dtype=np.int64)
    for p, d in enumerate(document_index):
        starts[p + 1] = starts[p] + lengths[d]
    sample_index = np.zeros((n + 1, 2), dtype=np.int64)  # row 0 is (0, 0) by convention
    for j in range(1, n + 1):
        token = j * seq_length
        p = int(np.searchsorted(starts, token, side="right")) - 1
        sample_index[j] = (p, token - starts[p])

    first = ((e - 1) * tokens_per_epoch - 1) // seq_length if separate else n
    shuffle_head = np.arange(first, dtype=np.uint32)
    rng.shuffle(shuffle_head)
    shuffle_tail = np.arange(first, n, dtype=np.uint32)
    if separate:
        rng.shuffle(shuffle_tail)
    shuffle_index = np.concatenate([shuffle_head, shuffle_tail])
    info = dict(num_epochs=e, separate=separate, tokens_per_epoch=tokens_per_epoch, begin=begin, end=end)
    return document_index, sample_index, shuffle_index, info


def reference_samples(documents, document_index, shuffle_index, seq_length):
    """Sample i = stream[j * L : j * L + L + 1] with j = shuffle_index[i], the stream being the
    documents concatenated in document_index order."""
    stream = np.concatenate([np.asarray(documents[d], dtype=np.int64) for d in document_index])
    return [stream[j * seq_length : j * seq_length + seq_length + 1] for j in shuffle_index]


def reference_blending(weights, size):
    total = sum(weights)
    w = [x / total for x in weights]
    counts = [0] * len(w)
    dataset_index, sample_index = [], []
    for i in range(size):
        best, best_err = None, None
        for d in range(len(w)):
            err = w[d] * max(i, 1) - counts[d]
            if best is None or err > best_err:
                best, best_err = d, err
        dataset_index.append(best)
        sample_index.append(counts[best])
        counts[best] += 1
    return np.array(dataset_index), np.array(sample_index)


def blend_sizes(weights, n, surplus=0.005):
    total = sum(weights)
    targets = [math.ceil(n * (x / total)) for x in weights]
    return targets, [math.ceil(t * (1 + surplus)) for t in targets]

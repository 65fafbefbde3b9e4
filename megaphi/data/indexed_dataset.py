"""Megatron-LM MMIDIDX v1 token files: the memory-mapped reader and the streaming builder.

Layout (little-endian, packed; see docs/design.md). ``PREFIX.bin`` holds every sequence's tokens back to
back, no header. ``PREFIX.idx``::

    0        9 bytes  magic b"MMIDIDX\\x00\\x00"
    9        u64      version = 1
    17       u8       dtype code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16)
    18       u64      S, number of sequences
    26       u64      D, number of document indices (documents + 1)
    34       i32[S]   sequence lengths in tokens
    34+4S    i64[S]   sequence byte offsets into .bin
    34+12S   i64[D]   document indices: 0, ..., S

so the .idx is exactly 34 + 12 S + 8 D bytes and the .bin sum(lengths) * itemsize bytes. Files are
byte-compatible with Megatron-LM's ``IndexedDataset`` in both directions.
"""

from __future__ import annotations

import os
import struct
from typing import Optional, Union

import numpy as np

_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D  (34 bytes)
HEADER_SIZE = _HEADER.size

DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, truncated or corrupt (the message names the file)."""


def dtype_code(dtype) -> int:
    """The MMIDIDX code of a numpy dtype."""
    try:
        return _CODES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise ValueError(
            f"dtype {dtype!r} has no MMIDIDX code (supported: {', '.join(np.dtype(v).name for v in DTYPES.values())})"
        ) from None


def dtype_for_vocab(vocab_size: int):
    """Megatron's rule: uint16 tokens when the vocabulary has fewer than 65500 entries, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def strip_suffix(path_prefix: Union[str, os.PathLike]) -> str:
    """The dataset prefix of PREFIX, PREFIX.bin or PREFIX.idx."""
    path_prefix = os.fspath(path_prefix)
    for suffix in (".bin", ".idx"):
        if path_prefix.endswith(suffix):
            return path_prefix[: -len(suffix)]
    return path_prefix


def read_index_header(idx_path: str):
    """(version, dtype, S, D) of an .idx file, validated; raises IndexedDatasetError."""
    try:
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as e:
        raise IndexedDatasetError(f"cannot read index file {idx_path}: {e.strerror or e}") from None
    if len(head) < HEADER_SIZE:
        raise IndexedDatasetError(
            f"index file {idx_path} is truncated: {len(head)} bytes, the MMIDIDX header alone is {HEADER_SIZE}"
        )
    magic, version, code, s, d = _HEADER.unpack(head)
    if magic != _INDEX_MAGIC:
        raise IndexedDatasetError(
            f"{idx_path} is not a Megatron MMIDIDX index (magic {magic!r}, expected {_INDEX_MAGIC!r})"
        )
    if version != _INDEX_VERSION:
        raise IndexedDatasetError(f"{idx_path}: unsupported MMIDIDX version {version} (expected {_INDEX_VERSION})")
    if code not in DTYPES:
        raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} (expected one of {sorted(DTYPES)})")
    return version, np.dtype(DTYPES[code]), s, d


class IndexedDataset:
    """Memory-mapped reader of ``PREFIX.bin`` / ``PREFIX.idx`` (Megatron MMIDIDX v1).

    ``len(ds)`` is the number of sequences; ``ds[i]`` is sequence i as a read-only numpy view of
    the .bin (``ds[a:b]`` a list of them); ``ds.get(i, offset, length)`` a part of it. Opening checks
    the header, the sizes of both files against it and the document indices' ends; every read checks
    its byte range, so a corrupt file gives an IndexedDatasetError naming it, never a numpy crash.
    """

    def __init__(self, path_prefix: Union[str, os.PathLike], mmap: bool = True):
        self.path_prefix = strip_suffix(path_prefix)
        self.idx_path = index_file_path(self.path_prefix)
        self.bin_path = data_file_path(self.path_prefix)
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise IndexedDatasetError(f"missing file {p} (dataset prefix {self.path_prefix})")

        _, self.dtype, s, d = read_index_header(self.idx_path)
        self.dtype_code = _CODES[self.dtype]
        self.itemsize = self.dtype.itemsize
        idx_size = os.path.getsize(self.idx_path)
        expected = HEADER_SIZE + 12 * s + 8 * d
        if idx_size != expected:
            raise IndexedDatasetError(
                f"index file {self.idx_path} is {'truncated' if idx_size < expected else 'corrupt'}: "
                f"{idx_size} bytes, but its header (S={s} sequences, D={d} document indices) "
                f"requires 34 + 12*S + 8*D = {expected}"
            )
        if d < 1:
            raise IndexedDatasetError(f"index file {self.idx_path} is corrupt: D = 0 document indices (need >= 1)")
        self.bin_size = os.path.getsize(self.bin_path)

        if s + d and mmap:
            idx = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
            lengths = np.frombuffer(idx, np.int32, count=s, offset=HEADER_SIZE)
            pointers = np.frombuffer(idx, np.int64, count=s, offset=HEADER_SIZE + 4 * s)
            doc_idx = np.frombuffer(idx, np.int64, count=d, offset=HEADER_SIZE + 12 * s)
        else:
            with open(self.idx_path, "rb") as f:
                f.seek(HEADER_SIZE)
                lengths = np.fromfile(f, np.int32, count=s)
                pointers = np.fromfile(f, np.int64, count=s)
                doc_idx = np.fromfile(f, np.int64, count=d)
        self.sequence_lengths = lengths
        self.sequence_pointers = pointers
        self.document_indices = doc_idx

        total = int(lengths.sum(dtype=np.int64)) if s else 0
        if s and int(lengths.min()) < 0:
            raise IndexedDatasetError(f"index file {self.idx_path} is corrupt: negative sequence length")
        if total * self.itemsize != self.bin_size:
            raise IndexedDatasetError(
                f"data file {self.bin_path} is {'truncated' if total * self.itemsize > self.bin_size else 'corrupt'}: "
                f"{self.bin_size} bytes, but {self.idx_path} lists {total} {self.dtype.name} tokens "
                f"({total * self.itemsize} bytes)"
            )
        if s and (int(pointers[0]) != 0 or int(pointers[-1]) + int(lengths[-1]) * self.itemsize != self.bin_size):
            raise IndexedDatasetError(
                f"index file {self.idx_path} is corrupt: sequence offsets do not span {self.bin_path}"
            )
        if int(doc_idx[0]) != 0 or int(doc_idx[-1]) != s:
            raise IndexedDatasetError(
                f"index file {self.idx_path} is corrupt: document indices must run from 0 to "
                f"S={s}, got {int(doc_idx[0])} .. {int(doc_idx[-1])}"
            )
        self.num_tokens = total

        if self.bin_size == 0:
            self._bin = np.empty(0, np.uint8)
        elif mmap:
            self._bin = np.memmap(self.bin_path, mode="r", dtype=np.uint8)
        else:
            self._bin = np.fromfile(self.bin_path, dtype=np.uint8)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def _check_index(self, idx: int) -> int:
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sequence index {idx} out of range for {self.path_prefix} ({n} sequences)")
        return idx

    def _read(self, idx: int, offset: int, length: int) -> np.ndarray:
        start = int(self.sequence_pointers[idx]) + offset * self.itemsize
        end = start + length * self.itemsize
        if start < 0 or end > self.bin_size or start % self.itemsize:
            raise IndexedDatasetError(
                f"index file {self.idx_path} is corrupt: sequence {idx} points at bytes "
                f"[{start}, {end}) outside {self.bin_path} ({self.bin_size} bytes)"
            )
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            idx = self._check_index(int(idx))
            return self._read(idx, 0, int(self.sequence_lengths[idx]))
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            return [self._read(i, 0, int(self.sequence_lengths[i])) for i in range(start, stop, step)]
        raise TypeError(f"IndexedDataset indices must be integers or slices, not {type(idx).__name__}")

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence idx (to its end when length is None)."""
        idx = self._check_index(int(idx))
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"range [{offset}, {offset + length}) outside sequence {idx} of length {size} in {self.path_prefix}"
            )
        return self._read(idx, offset, length)

    # ------------------------------------------------------------------ info
    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def sizes(self) -> np.ndarray:  # Megatron's older name
        return self.sequence_lengths

    def validate(self) -> None:
        """Full O(S + D) consistency check of the offsets and document indices (chunked)."""
        s, chunk = len(self), 1 << 20
        offset = 0
        for a in range(0, s, chunk):
            lens = self.sequence_lengths[a : a + chunk].astype(np.int64) * self.itemsize
            expect = offset + np.concatenate(([0], np.cumsum(lens[:-1])))
            if not np.array_equal(expect, self.sequence_pointers[a : a + chunk]):
                bad = a + int(np.flatnonzero(expect != self.sequence_pointers[a : a + chunk])[0])
                raise IndexedDatasetError(
                    f"index file {self.idx_path} is corrupt: offset of sequence {bad} is "
                    f"{int(self.sequence_pointers[bad])}, expected {int(expect[bad - a])}"
                )
            offset += int(lens.sum())
        di = self.document_indices
        for a in range(0, len(di) - 1, chunk):
            part = di[a : a + chunk + 1]
            if np.any(np.diff(part) < 0):
                raise IndexedDatasetError(f"index file {self.idx_path} is corrupt: document indices decrease")

    @staticmethod
    def exists(path_prefix) -> bool:
        p = strip_suffix(path_prefix)
        return os.path.isfile(index_file_path(p)) and os.path.isfile(data_file_path(p))

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}: {len(self)} sequences, {self.num_documents} documents, "
            f"{self.num_tokens} {self.dtype.name} tokens)"
        )


class IndexedDatasetBuilder:
    """Streaming writer of ``.bin`` / ``.idx`` (wraps the C++ ``megaphi._C.DatasetBuilder``).

    Tokens go to ``bin_path`` as they are added (converted to ``dtype`` with a range check that names
    the offending document); only the sequence lengths and document boundaries are kept, in C++.
    ``finalize(idx_path)`` writes the index. Inputs may be numpy arrays of any integer dtype (or
    sequences of ints).
    """

    def __init__(self, bin_path: Union[str, os.PathLike], dtype=np.int32, buffer_bytes: int = 8 << 20):
        from megaphi import _C

        self.dtype = np.dtype(dtype)
        self.bin_path = os.fspath(bin_path)
        self._builder = _C.DatasetBuilder(self.bin_path, dtype_code(self.dtype), int(buffer_bytes))

    @staticmethod
    def _array(tokens) -> np.ndarray:
        if isinstance(tokens, np.ndarray):
            return tokens.reshape(-1) if tokens.ndim != 1 else tokens
        arr = np.asarray(tokens)
        if arr.size == 0:
            return np.empty(0, np.int64)
        return arr.reshape(-1)

    def add_document(self, tokens) -> None:
        """Appends one document made of one sequence."""
        self._builder.add_document(self._array(tokens))

    def add_documents(self, tokens, lengths) -> None:
        """Appends len(lengths) one-sequence documents whose tokens are concatenated in ``tokens``."""
        self._builder.add_documents(self._array(tokens), np.asarray(lengths, dtype=np.int64))

    def add_item(self, tokens) -> None:
        """Appends one sequence to the current document (Megatron's name); see end_document()."""
        arr = self._array(tokens)
        self._builder.add_sequences(arr, np.array([arr.size], dtype=np.int64))

    def add_sequences(self, tokens, lengths, doc_ends=None) -> None:
        self._builder.add_sequences(
            self._array(tokens),
            np.asarray(lengths, dtype=np.int64),
            None if doc_ends is None else np.asarray(doc_ends, dtype=np.int64),
        )

    def end_document(self) -> None:
        self._builder.end_document()

    def add_index(self, path_prefix, chunk_tokens: int = 1 << 24) -> None:
        """Appends every sequence and document of another dataset (same dtype), streaming its files
        in chunks of about ``chunk_tokens`` tokens (memory stays bounded)."""
        ds = IndexedDataset(path_prefix, mmap=True)
        if ds.dtype != self.dtype:
            raise ValueError(
                f"cannot merge {ds.path_prefix} ({ds.dtype.name} tokens) into a {self.dtype.name} "
                f"dataset: all inputs must have the same dtype"
            )
        s = len(ds)
        lengths = ds.sequence_lengths
        doc_idx = ds.document_indices
        trivial = len(doc_idx) == s + 1 and (s == 0 or (int(doc_idx[1]) == 1 and bool(np.all(np.diff(doc_idx) == 1))))
        with open(ds.bin_path, "rb") as f:
            a = 0
            while a < s:
                # Take sequences [a, b) worth about chunk_tokens tokens (at least one sequence).
                cum = np.cumsum(lengths[a : a + (1 << 20)], dtype=np.int64)
                b = a + max(1, int(np.searchsorted(cum, chunk_tokens, side="right")))
                n_tok = int(cum[b - a - 1])
                tokens = np.fromfile(f, dtype=ds.dtype, count=n_tok)
                if tokens.size != n_tok:
                    raise IndexedDatasetError(f"data file {ds.bin_path} ended early while merging")
                lens = np.asarray(lengths[a:b], dtype=np.int64)
                if trivial:
                    self._builder.add_documents(tokens, lens)
                else:
                    lo = int(np.searchsorted(doc_idx, a + 1, side="left"))
                    hi = int(np.searchsorted(doc_idx, b, side="right"))
                    ends = np.unique(np.asarray(doc_idx[lo:hi], dtype=np.int64)) - a
                    self._builder.add_sequences(tokens, lens, ends)
                a = b
        if not trivial:
            self._builder.end_document()

    def finalize(self, idx_path: Union[str, os.PathLike]) -> None:
        self._builder.finalize(os.fspath(idx_path))

    def close(self) -> None:
        """Closes the .bin without an index (after an error; the caller removes the file)."""
        self._builder.close()

    @property
    def finalized(self) -> bool:
        """True once finalize() wrote the index (then close() has nothing left to do)."""
        return self._builder.finalized

    @property
    def num_documents(self) -> int:
        return self._builder.num_documents

    @property
    def num_sequences(self) -> int:
        return self._builder.num_sequences

    @property
    def num_tokens(self) -> int:
        return self._builder.num_tokens

    @property
    def bytes_written(self) -> int:
        return self._builder.bytes_written


def make_builder(bin_path, dtype=np.int32, **kwargs) -> IndexedDatasetBuilder:  # Megatron-style helper
    return IndexedDatasetBuilder(bin_path, dtype, **kwargs)

"""MMIDIDX v1 .bin/.idx: byte-level checks against hand-packed files, round trips, corrupt files."""

import os
import shutil
import struct

import numpy as np
import pytest

from megaphi.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, dtype_for_vocab

MAGIC = b"MMIDIDX\x00\x00"


def expected_idx(code, lengths, itemsize, doc_indices=None):
    """The .idx bytes written by hand from docs/design.md's table (independent of the code under test)."""
    s = len(lengths)
    if doc_indices is None:
        doc_indices = list(range(s + 1))
    offsets, acc = [], 0
    for n in lengths:
        offsets.append(acc)
        acc += n * itemsize
    out = (
        MAGIC
        + struct.pack("<Q", 1)
        + struct.pack("<B", code)
        + struct.pack("<Q", s)
        + struct.pack("<Q", len(doc_indices))
    )
    out += struct.pack(f"<{s}i", *lengths) + struct.pack(f"<{s}q", *offsets)
    out += struct.pack(f"<{len(doc_indices)}q", *doc_indices)
    return out


def build(prefix, docs, dtype):
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype)
    for d in docs:
        b.add_document(np.asarray(d, dtype=np.int64))
    b.finalize(str(prefix) + ".idx")
    return b


def test_tiny_idx_bytes_uint16(tmp_path):
    docs = [[5, 6, 7], [50256], [1, 2]]
    build(tmp_path / "a", docs, np.uint16)
    raw = (tmp_path / "a.idx").read_bytes()
    want = expected_idx(8, [3, 1, 2], 2)
    assert len(raw) == 34 + 12 * 3 + 8 * 4
    assert raw == want
    assert (tmp_path / "a.bin").read_bytes() == struct.pack("<6H", 5, 6, 7, 50256, 1, 2)


def test_tiny_idx_bytes_int32(tmp_path):
    docs = [[70000, 1], [], [3]]
    build(tmp_path / "a", docs, np.int32)
    assert (tmp_path / "a.idx").read_bytes() == expected_idx(4, [2, 0, 1], 4)
    assert (tmp_path / "a.bin").read_bytes() == struct.pack("<3i", 70000, 1, 3)


def test_empty_dataset(tmp_path):
    build(tmp_path / "e", [], np.uint16)
    assert (tmp_path / "e.idx").read_bytes() == expected_idx(8, [], 2)
    assert (tmp_path / "e.bin").read_bytes() == b""
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 0 and ds.num_tokens == 0


def test_reads_hand_written_files_with_multi_sequence_documents(tmp_path):
    # Two documents: [seq0, seq1] and [seq2]; int16 tokens (code 3).
    seqs = [[1, -2], [3], [4, 5, 6]]
    (tmp_path / "h.idx").write_bytes(expected_idx(3, [2, 1, 3], 2, doc_indices=[0, 2, 3]))
    (tmp_path / "h.bin").write_bytes(struct.pack("<6h", 1, -2, 3, 4, 5, 6))
    ds = IndexedDataset(str(tmp_path / "h"))
    assert ds.dtype == np.int16 and len(ds) == 3 and ds.num_documents == 2
    assert [x.tolist() for x in ds[:]] == seqs
    assert ds.document_indices.tolist() == [0, 2, 3]
    assert ds.sequence_pointers.tolist() == [0, 4, 6]
    assert ds.get(2, offset=1).tolist() == [5, 6]
    assert ds.get(2, offset=1, length=1).tolist() == [5]
    assert ds[-1].tolist() == [4, 5, 6]
    ds.validate()
    # The builder reproduces the same bytes from the same sequences and documents.
    b = IndexedDatasetBuilder(tmp_path / "w.bin", np.int16)
    b.add_item(seqs[0])
    b.add_item(seqs[1])
    b.end_document()
    b.add_item(seqs[2])
    b.finalize(tmp_path / "w.idx")
    assert (tmp_path / "w.idx").read_bytes() == (tmp_path / "h.idx").read_bytes()
    assert (tmp_path / "w.bin").read_bytes() == (tmp_path / "h.bin").read_bytes()


@pytest.mark.parametrize("out_dtype", [np.uint16, np.int32, np.int64, np.uint8])
@pytest.mark.parametrize("in_dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_round_trip_any_int_dtype(tmp_path, in_dtype, out_dtype):
    rng = np.random.default_rng(0)
    hi = min(np.iinfo(in_dtype).max, np.iinfo(out_dtype).max, 60000)
    docs = [rng.integers(0, hi + 1, size=rng.integers(0, 50)).astype(in_dtype) for _ in range(40)]
    b = IndexedDatasetBuilder(tmp_path / "r.bin", out_dtype, buffer_bytes=4096)  # many buffer flushes
    for d in docs[:20]:
        b.add_document(d)
    rest = docs[20:]
    b.add_documents(np.concatenate(rest), [len(d) for d in rest])
    assert b.num_documents == 40 and b.num_tokens == sum(len(d) for d in docs)
    b.finalize(tmp_path / "r.idx")
    ds = IndexedDataset(tmp_path / "r")
    assert ds.dtype == np.dtype(out_dtype) and len(ds) == 40
    for got, want in zip(ds[:], docs):
        assert got.dtype == np.dtype(out_dtype)
        np.testing.assert_array_equal(got.astype(np.int64), want.astype(np.int64))
    lengths = [len(d) for d in docs]
    assert (tmp_path / "r.idx").read_bytes() == expected_idx(
        {np.uint16: 8, np.int32: 4, np.int64: 5, np.uint8: 1}[out_dtype], lengths, np.dtype(out_dtype).itemsize
    )
    ds.validate()


def test_non_contiguous_and_list_inputs(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "n.bin", np.uint16)
    b.add_document(np.arange(10, dtype=np.int64)[::2])
    b.add_document([7, 8])
    b.finalize(tmp_path / "n.idx")
    assert [x.tolist() for x in IndexedDataset(tmp_path / "n")[:]] == [[0, 2, 4, 6, 8], [7, 8]]


@pytest.mark.parametrize(
    "bad,dtype", [(65536, np.uint16), (-1, np.uint16), (2**31, np.int32), (-(2**31) - 1, np.int32)]
)
def test_token_out_of_range_names_document(tmp_path, bad, dtype):
    b = IndexedDatasetBuilder(tmp_path / "o.bin", dtype)
    b.add_document(np.array([1, 2], np.int64))
    with pytest.raises(OverflowError, match=r"token id %d at position 2 of document 1 does not fit" % bad):
        b.add_document(np.array([3, 4, bad], np.int64))
    with pytest.raises(OverflowError, match=r"document 2 does not fit"):  # batch: names the document
        b.add_documents(np.array([1, 2, 3, bad], np.int64), [2, 2])
    # Nothing of the failed calls was written: the builder stays consistent.
    b.add_document(np.array([9], np.int64))
    b.finalize(tmp_path / "o.idx")
    assert [x.tolist() for x in IndexedDataset(tmp_path / "o")[:]] == [[1, 2], [9]]


def test_builder_rejects_bad_arguments(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "x.bin", np.uint16)
    with pytest.raises(TypeError, match="integer dtype"):
        b.add_document(np.array([1.5]))
    with pytest.raises(ValueError, match="lengths sum to 3"):
        b.add_documents(np.arange(4), [1, 2])
    b.finalize(tmp_path / "x.idx")
    with pytest.raises(RuntimeError, match="already finalized"):
        b.add_document([1])
    with pytest.raises(ValueError, match="MMIDIDX code"):
        IndexedDatasetBuilder(tmp_path / "y.bin", np.complex64)
    with pytest.raises(OSError, match="cannot open"):
        IndexedDatasetBuilder(tmp_path / "no" / "such" / "dir.bin", np.uint16)


def test_dtype_for_vocab():
    assert dtype_for_vocab(50295) == np.uint16
    assert dtype_for_vocab(51200) == np.uint16
    assert dtype_for_vocab(65499) == np.uint16
    assert dtype_for_vocab(65500) == np.int32
    assert dtype_for_vocab(100352) == np.int32


def test_merge_via_add_index(tmp_path):
    build(tmp_path / "a", [[1, 2], [3]], np.uint16)
    build(tmp_path / "b", [[4], [], [5, 6, 7]], np.uint16)
    b = IndexedDatasetBuilder(tmp_path / "m.bin", np.uint16)
    b.add_index(tmp_path / "a", chunk_tokens=1)
    b.add_index(tmp_path / "b", chunk_tokens=2)
    b.finalize(tmp_path / "m.idx")
    assert (tmp_path / "m.idx").read_bytes() == expected_idx(8, [2, 1, 1, 0, 3], 2)
    build(tmp_path / "c", [[1]], np.int32)
    b = IndexedDatasetBuilder(tmp_path / "m2.bin", np.uint16)
    with pytest.raises(ValueError, match="same dtype"):
        b.add_index(tmp_path / "c")


# --------------------------------------------------------------------------- corrupt files
@pytest.fixture
def good(tmp_path):
    build(tmp_path / "g", [[1, 2, 3], [4, 5], [6]], np.uint16)
    return tmp_path / "g"


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_missing_files(good):
    os.remove(str(good) + ".bin")
    with pytest.raises(IndexedDatasetError, match=r"missing file .*g\.bin"):
        IndexedDataset(good)


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("magic", "not a Megatron MMIDIDX index"),
        ("version", "unsupported MMIDIDX version 2"),
        ("dtype", "unknown dtype code 9"),
        ("truncated_header", "truncated.*header"),
        ("truncated_idx", "index file .*g.idx is truncated"),
        ("extra_idx", "index file .*g.idx is corrupt"),
        ("truncated_bin", "data file .*g.bin is truncated"),
        ("extra_bin", "data file .*g.bin is corrupt"),
        ("sequence_count", "index file .*g.idx is (truncated|corrupt)"),
        ("doc_indices", "document indices must run from 0"),
        ("pointer_end", "offsets do not span"),
        ("negative_length", "negative sequence length|truncated|corrupt"),
    ],
)
def test_corrupt_files_give_clear_errors(good, case, pattern):
    idx, bin_ = good.with_suffix(".idx"), good.with_suffix(".bin")
    if case == "magic":
        _patch(idx, 0, b"XXIDIDX")
    elif case == "version":
        _patch(idx, 9, struct.pack("<Q", 2))
    elif case == "dtype":
        _patch(idx, 17, b"\x09")
    elif case == "truncated_header":
        idx.write_bytes(idx.read_bytes()[:20])
    elif case == "truncated_idx":
        idx.write_bytes(idx.read_bytes()[:-3])
    elif case == "extra_idx":
        idx.write_bytes(idx.read_bytes() + b"\0")
    elif case == "truncated_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif case == "extra_bin":
        bin_.write_bytes(bin_.read_bytes() + b"\0\0")
    elif case == "sequence_count":
        _patch(idx, 18, struct.pack("<Q", 2**60))
    elif case == "doc_indices":
        _patch(idx, 34 + 12 * 3 + 8 * 3, struct.pack("<q", 2))
    elif case == "pointer_end":
        _patch(idx, 34 + 12 + 16, struct.pack("<q", 2))
    elif case == "negative_length":
        _patch(idx, 34, struct.pack("<i", -1))
    with pytest.raises(IndexedDatasetError, match=pattern):
        IndexedDataset(good)


def test_corrupt_pointer_is_caught_on_access(good):
    _patch(good.with_suffix(".idx"), 34 + 12 + 8, struct.pack("<q", 1 << 40))  # sequence 1's offset
    ds = IndexedDataset(good)  # cheap checks pass (ends are fine) ...
    assert ds[0].tolist() == [1, 2, 3]
    with pytest.raises(IndexedDatasetError, match=r"sequence 1 points at bytes .* outside .*g\.bin"):
        ds[1]
    with pytest.raises(IndexedDatasetError, match="offset of sequence 1"):
        ds.validate()


def test_index_errors(good):
    ds = IndexedDataset(str(good) + ".idx")  # a path with the suffix is accepted
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=2)
    with pytest.raises(TypeError):
        ds["a"]


@pytest.mark.slow
def test_more_than_2_31_bytes_and_tokens(tmp_path):
    """int64 offsets: 2^31 + 2^20 uint8 tokens (> 2^31 bytes and tokens)."""
    if shutil.disk_usage(tmp_path).free < 8 * 2**30:
        pytest.skip("needs ~3 GB of free disk")
    chunk = np.full(2**26, 7, dtype=np.uint8)
    n = 2**31 // 2**26
    b = IndexedDatasetBuilder(tmp_path / "big.bin", np.uint8)
    for _ in range(n):
        b.add_document(chunk)
    b.add_document(np.arange(2**20, dtype=np.int64) % 251)
    b.finalize(tmp_path / "big.idx")
    ds = IndexedDataset(tmp_path / "big")
    assert ds.num_tokens == 2**31 + 2**20
    assert int(ds.sequence_pointers[-1]) == 2**31
    last = ds[-1]
    assert last.size == 2**20 and int(last[-1]) == (2**20 - 1) % 251 and int(last[0]) == 0
    assert int(ds.get(n - 1, offset=2**26 - 1, length=1)[0]) == 7

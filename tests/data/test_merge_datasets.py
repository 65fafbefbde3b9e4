"""tools/merge_datasets.py: byte-exact concatenation, dtype checks, atomic outputs."""

import os
import struct
import subprocess
import sys

import numpy as np

from megaphi.cli import merge_datasets as md
from megaphi.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "merge_datasets.py")


def build(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for d in docs:
        b.add_document(np.asarray(d, dtype=np.int64))
    b.finalize(f"{prefix}.idx")


def hand_idx(lengths, code=8, itemsize=2):
    s = len(lengths)
    offsets = [sum(lengths[:i]) * itemsize for i in range(s)]
    return (
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, code, s, s + 1)
        + struct.pack(f"<{s}i", *lengths)
        + struct.pack(f"<{s}q", *offsets)
        + struct.pack(f"<{s + 1}q", *range(s + 1))
    )


def test_merge_is_byte_exact_concatenation(tmp_path):
    rng = np.random.default_rng(1)
    parts = [[rng.integers(0, 50000, rng.integers(0, 30)).tolist() for _ in range(n)] for n in (5, 0, 17)]
    for i, docs in enumerate(parts):
        build(tmp_path / f"p{i}", docs)
    # small chunks: many partial reads of each input
    rc = md.main(
        ["--input"]
        + [str(tmp_path / f"p{i}") for i in range(3)]
        + ["--output-prefix", str(tmp_path / "m"), "--chunk-tokens", "7"]
    )
    assert rc == 0
    all_docs = [d for docs in parts for d in docs]
    assert (tmp_path / "m.bin").read_bytes() == b"".join(struct.pack(f"<{len(d)}H", *d) for d in all_docs)
    assert (tmp_path / "m.idx").read_bytes() == hand_idx([len(d) for d in all_docs])


def test_merge_keeps_multi_sequence_documents(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "a.bin", np.int32)
    b.add_item([1, 2])
    b.add_item([3])
    b.end_document()
    b.add_item([4])
    b.end_document()
    b.finalize(tmp_path / "a.idx")
    build(tmp_path / "b", [[5], [6, 7]], np.int32)
    rc = md.main(
        [
            "--input",
            str(tmp_path / "a.idx"),
            str(tmp_path / "b.bin"),
            "--output-prefix",
            str(tmp_path / "m"),
            "--chunk-tokens",
            "1",
        ]
    )
    assert rc == 0
    ds = IndexedDataset(tmp_path / "m")
    assert [x.tolist() for x in ds[:]] == [[1, 2], [3], [4], [5], [6, 7]]
    assert ds.document_indices.tolist() == [0, 2, 3, 4, 5]


def test_merge_folder_and_subprocess(tmp_path):
    (tmp_path / "parts").mkdir()
    build(tmp_path / "parts" / "b", [[3]])
    build(tmp_path / "parts" / "a", [[1, 2]])
    r = subprocess.run(
        [sys.executable, TOOL, "--input", str(tmp_path / "parts"), "--output-prefix", str(tmp_path / "m")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "merged 2 datasets" in r.stdout  # the result on stdout
    assert [x.tolist() for x in IndexedDataset(tmp_path / "m")[:]] == [[1, 2], [3]]  # sorted: a then b


def test_merge_errors(tmp_path, capsys):
    build(tmp_path / "u", [[1]], np.uint16)
    build(tmp_path / "i", [[1]], np.int32)
    assert md.main(["--input", str(tmp_path / "u"), str(tmp_path / "i"), "--output-prefix", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "different token dtypes" in err and "u (uint16)" in err and "i (int32)" in err
    assert not list(tmp_path.glob("m*"))
    assert (
        md.main(["--input", str(tmp_path / "u"), str(tmp_path / "missing"), "--output-prefix", str(tmp_path / "m")])
        == 1
    )
    assert "missing file" in capsys.readouterr().err
    (tmp_path / "u.bin").write_bytes(b"\0" * 3)  # corrupt input: one byte too many
    assert md.main(["--input", str(tmp_path / "u"), "--output-prefix", str(tmp_path / "m")]) == 1
    assert "u.bin is corrupt" in capsys.readouterr().err
    build(tmp_path / "u", [[1]], np.uint16)
    assert md.main(["--input", str(tmp_path / "u"), "--output-prefix", str(tmp_path / "m")]) == 0
    assert md.main(["--input", str(tmp_path / "u"), "--output-prefix", str(tmp_path / "m")]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert md.main(["--input", str(tmp_path / "u"), "--output-prefix", str(tmp_path / "u"), "--overwrite"]) == 1
    assert "is also an input" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.bin", "i.idx", "m.bin", "m.idx", "u.bin", "u.idx"]

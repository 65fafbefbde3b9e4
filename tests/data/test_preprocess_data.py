"""tools/preprocess_data.py end to end: formats, order, keys, bad inputs, --strict, atomic outputs.
Parquet / HF datasets inputs, size limits, signals and stale temporaries: test_preprocess_inputs.py."""

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from megaphi.cli import preprocess_data as pp
from megaphi.data import preprocess_workers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")  # a wrapper of pp.main, run as a script
EOD = 50256


@pytest.fixture
def ref_tok(codegen_tokenizer_dir):
    """Reference ids straight from the `tokenizers` library (not through megaphi)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(codegen_tokenizer_dir / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def expected_files(docs_ids, append_eod=True):
    """.bin and .idx bytes for uint16 documents, packed by hand per docs/design.md."""
    seqs = [list(ids) + ([EOD] if append_eod else []) for ids in docs_ids]
    s = len(seqs)
    lengths = [len(x) for x in seqs]
    offsets = list(np.cumsum([0] + lengths[:-1]) * 2) if s else []
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, s, s + 1)
    idx += (
        struct.pack(f"<{s}i", *lengths)
        + struct.pack(f"<{s}q", *map(int, offsets))
        + struct.pack(f"<{s + 1}q", *range(s + 1))
    )
    return struct.pack(f"<{sum(lengths)}H", *[t for x in seqs for t in x]), idx


def write_jsonl(path, records, opener=open):
    with opener(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())


def run_tool(args, tok_dir, subprocess_mode=False):
    argv = list(map(str, args)) + ["--tokenizer", str(tok_dir), "--quiet"]
    if subprocess_mode:
        r = subprocess.run([sys.executable, TOOL] + argv, capture_output=True, text=True)
        return r.returncode, r.stderr
    return pp.main(argv), None


TEXTS = [
    "def hello_world():\n    print('hi')\n\treturn 1\n",
    "import os\n\nclass A:\n    x = 1\n",
    "# ünïcödé 日本語 🙂\nprint(1)\n",
    "x = '<|endoftext|>'\n",
    "    \n\tdef f(): pass",
]


@pytest.fixture
def corpus(tmp_path):
    """A JSONL file, a gzipped JSONL file and a source tree, in that input order."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS[:3])])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in TEXTS[3:]], opener=gzip.open)
    src = tmp_path / "src"
    (src / "pkg" / "sub").mkdir(parents=True)
    files = {
        "pkg.py": "PKG = 1\n",  # sorts before pkg/... ('.' < '/')
        "pkg/__init__.py": "from .sub import m\n",
        "pkg/sub/m.py": "def m():\n    return 2\n",
        "pkg/z.py": "Z = 3\n",
        "pkg/readme.txt": "not python\n",
        "a_first.py": "A = 0\n",
        "pkg-x.py": "X = 9\n",  # '-' < '.' < '/'
    }
    for rel, text in files.items():
        (src / rel).write_text(text)
    py_order = sorted(r for r in files if r.endswith(".py"))  # full-path sort
    return tmp_path, TEXTS + [files[r] for r in py_order]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_mixed_inputs_byte_exact_in_order(corpus, codegen_tokenizer_dir, ref_tok, workers, monkeypatch):
    tmp, texts = corpus
    monkeypatch.setattr(
        preprocess_workers, "ENCODE_CHARS", 40
    )  # several encode_batch calls per batch (workers are forked)
    out = tmp / f"out{workers}"
    rc, _ = run_tool(
        [
            "--input",
            tmp / "a.jsonl",
            tmp / "b.jsonl.gz",
            tmp / "src",
            "--output-prefix",
            out,
            "--workers",
            workers,
            "--batch-size",
            2,
        ],
        codegen_tokenizer_dir,
    )
    assert rc == 0
    want_bin, want_idx = expected_files([ref_tok(t) for t in texts])
    assert (tmp / f"out{workers}_text_document.bin").read_bytes() == want_bin
    assert (tmp / f"out{workers}_text_document.idx").read_bytes() == want_idx
    assert sorted(os.listdir(tmp)) == sorted(
        ["a.jsonl", "b.jsonl.gz", "src", f"out{workers}_text_document.bin", f"out{workers}_text_document.idx"]
    )


def test_subprocess_extensions_and_no_eod(corpus, codegen_tokenizer_dir, ref_tok):
    tmp, _ = corpus
    rc, err = run_tool(
        [
            "--input",
            tmp / "src",
            "--output-prefix",
            tmp / "o",
            "--extensions",
            "txt,.py",
            "--no-append-eod",
            "--workers",
            "2",
        ],
        codegen_tokenizer_dir,
        subprocess_mode=True,
    )
    assert rc == 0, err
    r = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--input",
            str(tmp / "src"),
            "--output-prefix",
            str(tmp / "o"),
            "--extensions",
            "txt,.py",
            "--no-append-eod",
            "--workers",
            "0",
            "--overwrite",
            "--quiet",
            "--tokenizer",
            str(codegen_tokenizer_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "done: 7 documents" in r.stdout and "skipped 0 records" in r.stdout  # the summary: stdout
    from megaphi.data.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp / "o_text_document"))
    order = ["a_first.py", "pkg-x.py", "pkg.py", "pkg/__init__.py", "pkg/readme.txt", "pkg/sub/m.py", "pkg/z.py"]
    assert [x.tolist() for x in ds[:]] == [ref_tok((tmp / "src" / r).read_text()) for r in order]


def test_several_json_keys(tmp_path, codegen_tokenizer_dir, ref_tok):
    write_jsonl(tmp_path / "k.jsonl", [{"text": "a = 1\n", "doc": "b = 2\n"}, {"text": "c\n", "doc": "d\n"}])
    rc, _ = run_tool(
        [
            "--input",
            tmp_path / "k.jsonl",
            "--json-keys",
            "text",
            "doc",
            "--output-prefix",
            tmp_path / "p",
            "--workers",
            "1",
        ],
        codegen_tokenizer_dir,
    )
    assert rc == 0
    for key, texts in (("text", ["a = 1\n", "c\n"]), ("doc", ["b = 2\n", "d\n"])):
        want_bin, want_idx = expected_files([ref_tok(t) for t in texts])
        assert (tmp_path / f"p_{key}_document.bin").read_bytes() == want_bin
        assert (tmp_path / f"p_{key}_document.idx").read_bytes() == want_idx


# ------------------------------------------------------------------------- bad inputs
BAD_CASES = {
    # name: (jsonl lines or None, reason printed, location suffix)
    "malformed JSON": ([b'{"text": "ok"}\n', b'{"text": \n'], "malformed JSON", "bad.jsonl:2"),
    "not an object": ([b'{"text": "ok"}\n', b'["text"]\n'], "malformed JSON", "bad.jsonl:2"),
    "missing key": ([b'{"text": "ok"}\n', b'{"body": "x"}\n'], "missing key", "bad.jsonl:2"),
    "non-string value": ([b'{"text": "ok"}\n', b'{"text": 12}\n'], "non-string value", "bad.jsonl:2"),
    "undecodable bytes": ([b'{"text": "ok"}\n', b'{"text": "\xff\xfe"}\n'], "undecodable bytes", "bad.jsonl:2"),
    "surrogate": ([b'{"text": "ok"}\n', b'{"text": "\\ud800"}\n'], "undecodable bytes", "bad.jsonl:2"),
    "empty document": ([b'{"text": "ok"}\n', b'{"text": "  \\n"}\n'], "empty document", "bad.jsonl:2"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_jsonl_record_skipped_or_strict(tmp_path, codegen_tokenizer_dir, ref_tok, case, capsys):
    lines, reason, where = BAD_CASES[case]
    write_jsonl(tmp_path / "bad.jsonl", lines + [b"\n", b'{"text": "last"}\n'])  # a blank line is ignored
    rc, _ = run_tool(
        ["--input", tmp_path / "bad.jsonl", "--output-prefix", tmp_path / "o", "--workers", "0"], codegen_tokenizer_dir
    )
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 0
    assert f"skipped {reason} at {tmp_path / where}" in err
    assert f"skipped 1 records (1 {reason})" in captured.out
    want_bin, want_idx = expected_files([ref_tok("ok"), ref_tok("last")])
    assert (tmp_path / "o_text_document.bin").read_bytes() == want_bin
    assert (tmp_path / "o_text_document.idx").read_bytes() == want_idx

    rc, _ = run_tool(
        ["--input", tmp_path / "bad.jsonl", "--output-prefix", tmp_path / "s", "--workers", "1", "--strict"],
        codegen_tokenizer_dir,
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert f"error: {reason} at {tmp_path / where}" in err and "(--strict)" in err
    assert not [f for f in os.listdir(tmp_path) if f.startswith("s_")]  # nothing left, not even temp files


def test_bad_files_in_tree_and_truncated_gzip(tmp_path, codegen_tokenizer_dir, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("A = 1\n")
    (src / "b.py").write_bytes(b"x = '\xff'\n")  # not UTF-8
    (src / "c.py").write_text("")  # empty
    os.symlink(src / "missing.py", src / "d.py")  # unreadable (dangling link)
    (src / "e.py").write_text("E = 5\n")
    data = gzip.compress(b"".join(json.dumps({"text": f"v{i} = {i}\n"}).encode() + b"\n" for i in range(2000)))
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])  # truncated gzip stream
    rc, _ = run_tool(
        ["--input", src, tmp_path / "t.jsonl.gz", "--output-prefix", tmp_path / "o", "--workers", "2"],
        codegen_tokenizer_dir,
    )
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 0
    assert f"undecodable bytes at {src / 'b.py'}" in err
    assert f"empty document at {src / 'c.py'}" in err
    assert f"unreadable file at {src / 'd.py'}" in err
    assert f"unreadable file at {tmp_path / 't.jsonl.gz'}" in err
    assert "(1 empty document, 1 undecodable bytes, 2 unreadable file)" in captured.out  # the summary
    from megaphi.data.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert 2 < len(ds) < 2002  # a.py, e.py and the readable part of the gzip stream
    rc, _ = run_tool(["--input", src, "--output-prefix", tmp_path / "s", "--strict"], codegen_tokenizer_dir)
    assert rc == 1 and f"undecodable bytes at {src / 'b.py'}" in capsys.readouterr().err
    assert not list(tmp_path.glob("s_*"))


def test_token_that_does_not_fit_is_an_error(tmp_path, codegen_tokenizer_dir, monkeypatch, capsys):
    import megaphi.data.indexed_dataset as idx_mod

    monkeypatch.setattr(idx_mod, "dtype_for_vocab", lambda v: np.uint8)  # codegen ids do not fit uint8
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "def f(): pass"}])
    rc, _ = run_tool(
        ["--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o", "--workers", "0"], codegen_tokenizer_dir
    )
    err = capsys.readouterr().err
    assert rc == 1 and "does not fit uint8" in err and "of document 0" in err
    assert not list(tmp_path.glob("o_*"))


def test_existing_outputs_and_arguments(tmp_path, codegen_tokenizer_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x = 1"}])
    args = ["--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o", "--workers", "0"]
    assert run_tool(args, codegen_tokenizer_dir)[0] == 0
    before = (tmp_path / "o_text_document.bin").stat().st_mtime_ns
    assert run_tool(args, codegen_tokenizer_dir)[0] == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "o_text_document.bin").stat().st_mtime_ns == before
    assert run_tool(args + ["--overwrite"], codegen_tokenizer_dir)[0] == 0
    assert (
        run_tool(["--input", tmp_path / "nope.jsonl", "--output-prefix", tmp_path / "n"], codegen_tokenizer_dir)[0] == 1
    )
    assert "--input" in capsys.readouterr().err
    rc = pp.main(
        [
            "--input",
            str(tmp_path / "a.jsonl"),
            "--output-prefix",
            str(tmp_path / "n"),
            "--tokenizer",
            str(tmp_path / "no_tokenizer.json"),
            "--quiet",
        ]
    )
    assert rc == 1 and "no such file or folder" in capsys.readouterr().err


def test_make_stdlib_corpus(tmp_path, codegen_tokenizer_dir, ref_tok):
    from megaphi.cli import make_stdlib_corpus as mk

    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "site-packages").mkdir()
    (lib / "a.py").write_text("A = 1\n")
    (lib / "pkg" / "b.py").write_text("B = 2\n")
    (lib / "bad.py").write_bytes(b"\xff\n")
    (lib / "site-packages" / "c.py").write_text("C = 3\n")
    out = tmp_path / "c.jsonl"
    assert mk.main(["--output", str(out), "--stdlib-dir", str(lib)]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs == [{"text": "A = 1\n", "path": "a.py"}, {"text": "B = 2\n", "path": "pkg/b.py"}]
    assert mk.main(["--output", str(out), "--stdlib-dir", str(lib)]) == 1  # exists
    assert mk.main(["--output", str(out), "--stdlib-dir", str(lib), "--target-size", "100B", "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 3  # repeated until >= 100 bytes (each record ~36 bytes)
    assert (
        pp.main(
            [
                "--input",
                str(out),
                "--output-prefix",
                str(tmp_path / "o"),
                "--tokenizer",
                str(codegen_tokenizer_dir),
                "--quiet",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    want_bin, _ = expected_files([ref_tok("A = 1\n"), ref_tok("B = 2\n"), ref_tok("A = 1\n")])
    assert (tmp_path / "o_text_document.bin").read_bytes() == want_bin

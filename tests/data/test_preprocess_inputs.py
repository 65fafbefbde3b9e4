"""tools/preprocess_data.py: parquet and Hugging Face datasets inputs (same files whatever the format),
the byte-based progress bar, per-document size limit, non-regular files, deeply nested JSON, unknown
inputs, zero documents, signals and stale temporary files."""

import gzip
import os
import signal
import subprocess
import sys
import time

import pytest

from test_preprocess_data import TEXTS, TOOL, expected_files, run_tool, write_jsonl

DOCS = TEXTS + ["def g(x):\n    return x * 2\n", "print('last')\n"]


@pytest.fixture
def ref_tok(codegen_tokenizer_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(codegen_tokenizer_dir / "tokenizer.json"))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def write_parquet(path, columns, row_group_size=2):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)


def save_hf(path, columns, split=None):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(columns)
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(path))


def out_files(prefix):
    return (prefix.parent / (prefix.name + "_text_document.bin")).read_bytes(), (
        prefix.parent / (prefix.name + "_text_document.idx")
    ).read_bytes()


def test_same_documents_same_files_whatever_the_format(tmp_path, codegen_tokenizer_dir, ref_tok):
    """JSONL, gzipped JSONL, parquet (several row groups, extra columns), a saved Dataset, a saved
    DatasetDict split, hf:<local folder of parquet> and a mix of them: byte-identical .bin/.idx."""
    ids = list(range(len(DOCS)))
    write_jsonl(tmp_path / "c.jsonl", [{"id": i, "text": t} for i, t in zip(ids, DOCS)])
    write_jsonl(tmp_path / "c.jsonl.gz", [{"text": t} for t in DOCS], opener=gzip.open)
    write_parquet(tmp_path / "c.parquet", {"id": ids, "text": DOCS}, row_group_size=3)
    save_hf(tmp_path / "saved", {"text": DOCS, "id": ids})
    save_hf(tmp_path / "saved_dict", {"text": DOCS}, split="validation")
    (tmp_path / "hub").mkdir()
    write_parquet(tmp_path / "hub" / "train-00000.parquet", {"text": DOCS})
    write_parquet(tmp_path / "part1.parquet", {"text": DOCS[:3]})
    save_hf(tmp_path / "part2", {"text": DOCS[3:6]})
    write_jsonl(tmp_path / "part3.jsonl", [{"text": t} for t in DOCS[6:]])
    want = expected_files([ref_tok(t) for t in DOCS])
    runs = {  # name: (inputs, extra flags)
        "jsonl": (["c.jsonl"], []),
        "gz": (["c.jsonl.gz"], []),
        "parquet": (["c.parquet"], []),
        "saved": (["saved"], []),
        "dict": (["saved_dict"], ["--hf-split", "validation"]),
        "hub": (["hf:" + str(tmp_path / "hub")], []),
        "mixed": (["part1.parquet", "part2", "part3.jsonl"], []),
    }
    for name, (names, extra) in runs.items():
        inputs = [n if n.startswith("hf:") else tmp_path / n for n in names]
        workers = 2 if name == "parquet" else 0
        rc, _ = run_tool(
            ["--input", *inputs, *extra, "--output-prefix", tmp_path / name, "--workers", workers, "--batch-size", 2],
            codegen_tokenizer_dir,
        )
        assert rc == 0, name
        assert out_files(tmp_path / name) == want, name


class _Bar:
    """Records what preprocess_data.py tells its progress bar."""

    made = []

    def __init__(self, total=None, unit=None, **kw):
        self.total, self.unit, self.n = total, unit, 0
        _Bar.made.append(self)

    def update(self, n):
        self.n += n

    def set_postfix_str(self, *a, **k):
        pass

    def write(self, *a, **k):
        pass

    def close(self):
        pass


def test_progress_bar_counts_input_bytes(tmp_path, codegen_tokenizer_dir, monkeypatch):
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in DOCS])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in DOCS * 50], opener=gzip.open)
    write_parquet(tmp_path / "c.parquet", {"text": DOCS})
    save_hf(tmp_path / "d", {"text": DOCS})
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.py").write_text("X = 1\n")
    files = ["a.jsonl", "b.jsonl.gz", "c.parquet"]
    arrow = sum(os.path.getsize(tmp_path / "d" / f) for f in os.listdir(tmp_path / "d") if f.endswith(".arrow"))
    total = sum(os.path.getsize(tmp_path / f) for f in files) + arrow
    _Bar.made.clear()
    rc, _ = run_tool(
        [
            "--input",
            *[tmp_path / f for f in files],
            tmp_path / "d",
            "--output-prefix",
            tmp_path / "o",
            "--workers",
            1,
            "--batch-size",
            3,
        ],
        codegen_tokenizer_dir,
    )
    assert rc == 0
    (bar,) = _Bar.made
    assert (bar.unit, bar.total, bar.n) == ("B", total, total)  # known total: tqdm shows percent and ETA
    _Bar.made.clear()
    rc, _ = run_tool(
        ["--input", tmp_path / "a.jsonl", tmp_path / "src", "--output-prefix", tmp_path / "p", "--workers", 0],
        codegen_tokenizer_dir,
    )
    assert rc == 0
    (bar,) = _Bar.made
    assert bar.total is None and bar.n == os.path.getsize(tmp_path / "a.jsonl") + 6  # a folder: no total


def test_parquet_and_dataset_bad_rows_reported(tmp_path, codegen_tokenizer_dir, ref_tok, capsys):
    write_parquet(tmp_path / "p.parquet", {"text": ["ok = 1\n", None, " \n", "fine\n"]})
    save_hf(tmp_path / "d", {"text": ["last\n", ""]})
    rc, _ = run_tool(
        ["--input", tmp_path / "p.parquet", tmp_path / "d", "--output-prefix", tmp_path / "o", "--workers", 0],
        codegen_tokenizer_dir,
    )
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 0, err
    assert f"skipped non-string value at {tmp_path / 'p.parquet'}:row 1: key 'text' holds NoneType" in err
    assert f"skipped empty document at {tmp_path / 'p.parquet'}:row 2: key 'text'" in err
    assert f"skipped empty document at {tmp_path / 'd'}:row 1: key 'text'" in err
    assert "skipped 3 records (2 empty document, 1 non-string value)" in captured.out  # the summary: stdout
    assert out_files(tmp_path / "o") == expected_files([ref_tok(t) for t in ("ok = 1\n", "fine\n", "last\n")])
    rc, _ = run_tool(
        ["--input", tmp_path / "p.parquet", "--output-prefix", tmp_path / "s", "--strict"], codegen_tokenizer_dir
    )
    assert rc == 1 and f"error: non-string value at {tmp_path / 'p.parquet'}:row 1" in capsys.readouterr().err
    assert not list(tmp_path.glob("s_*"))


def test_hub_dataset_that_cannot_load_is_one_line(tmp_path, codegen_tokenizer_dir, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'bigcode/the-stack-smol' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    rc, _ = run_tool(
        ["--input", "hf:bigcode/the-stack-smol", "--output-prefix", tmp_path / "o", "--workers", 0],
        codegen_tokenizer_dir,
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert (
        "error: --input hf:bigcode/the-stack-smol: cannot load the dataset: ConnectionError: Couldn't reach "
        "'bigcode/the-stack-smol' on the Hub (LocalEntryNotFoundError)\n"
    ) in err
    assert not list(tmp_path.glob("o_*"))


def test_oversized_documents_skipped_and_never_held(tmp_path, codegen_tokenizer_dir, ref_tok, capsys):
    limit = 1000
    big = "x = 1\n" * 400  # 2400 bytes
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a\n"}, {"text": big}, {"text": "b\n"}])
    write_parquet(tmp_path / "b.parquet", {"text": ["c\n", big, "d\n"]})
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.py").write_text(big)
    (tmp_path / "src" / "small.py").write_text("e\n")
    line = len(f'{{"text": "{big}"}}'.replace("\n", "\\n"))  # the JSON line's bytes, newline excluded
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.parquet", tmp_path / "src"]
    # The reader hands workers a size marker, not the record.
    from megaphi.data.corpus_readers import Oversize, iter_batches

    items = [
        it for b in iter_batches([str(p) for p in inputs], (".py",), 10, max_document_bytes=limit) for it in b.items
    ]

    assert items[1] == Oversize(line + 1)  # read in chunks, counted with its newline
    assert items[4] == {"text": Oversize(len(big))}
    rc, _ = run_tool(
        ["--input", *inputs, "--output-prefix", tmp_path / "o", "--workers", 1, "--max-document-bytes", limit],
        codegen_tokenizer_dir,
    )
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 0, err
    assert (
        f"skipped document too large at {tmp_path / 'a.jsonl'}:2: line of {line + 1:,} bytes > "
        f"--max-document-bytes 1,000" in err
    )
    assert f"skipped document too large at {tmp_path / 'b.parquet'}:row 1: key 'text': 2,400 bytes" in err
    assert f"skipped document too large at {tmp_path / 'src' / 'big.py'}: 2,400 bytes" in err
    assert "skipped 3 records (3 document too large)" in captured.out
    assert out_files(tmp_path / "o") == expected_files([ref_tok(t) for t in ("a\n", "b\n", "c\n", "d\n", "e\n")])


def test_deeply_nested_json_is_a_bad_record(tmp_path, codegen_tokenizer_dir, ref_tok, capsys):
    deep = b'{"meta": ' + b"[" * 100_000 + b"]" * 100_000 + b', "text": "lost"}\n'
    write_jsonl(tmp_path / "n.jsonl", [{"text": "a\n"}, deep, {"text": "b\n"}])
    for workers in (0, 1):
        rc, _ = run_tool(
            ["--input", tmp_path / "n.jsonl", "--output-prefix", tmp_path / f"o{workers}", "--workers", workers],
            codegen_tokenizer_dir,
        )
        captured = capsys.readouterr()
        err = captured.err
        assert rc == 0, err
        assert f"skipped malformed JSON at {tmp_path / 'n.jsonl'}:2: nested too deeply" in err
        assert "skipped 1 records (1 malformed JSON)" in captured.out
        assert out_files(tmp_path / f"o{workers}") == expected_files([ref_tok("a\n"), ref_tok("b\n")])


def test_fifos_are_skipped_not_waited_on(tmp_path, codegen_tokenizer_dir, ref_tok):
    """A FIFO named *.py in a tree and FIFOs given as inputs: skipped and counted, no hang (a subprocess
    with a timeout, so that a regression fails instead of hanging the suite)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("A = 1\n")
    os.mkfifo(src / "b.py")
    (src / "c.py").write_text("C = 3\n")
    os.mkfifo(tmp_path / "in.py")
    os.mkfifo(tmp_path / "in.jsonl")
    r = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--input",
            str(src),
            str(tmp_path / "in.py"),
            str(tmp_path / "in.jsonl"),
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer",
            str(codegen_tokenizer_dir),
            "--quiet",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    for p in (src / "b.py", tmp_path / "in.py", tmp_path / "in.jsonl"):
        assert f"skipped not a regular file at {p}\n" in r.stderr
    assert "skipped 3 records (3 not a regular file)" in r.stdout
    assert out_files(tmp_path / "o") == expected_files([ref_tok("A = 1\n"), ref_tok("C = 3\n")])


def test_unknown_input_type_is_an_error(tmp_path, codegen_tokenizer_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x = 1"}])
    (tmp_path / "data.xyz").write_text("x = 1\n")
    rc, _ = run_tool(
        ["--input", tmp_path / "a.jsonl", tmp_path / "data.xyz", "--output-prefix", tmp_path / "o"],
        codegen_tokenizer_dir,
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert err.splitlines()[0].startswith(
        f"error: --input {tmp_path / 'data.xyz'}: unknown file type (expected "
        ".jsonl, .json, .jsonl.gz, .json.gz, .parquet, a folder, hf:NAME"
    )
    assert err.splitlines()[1:] == ["no output was written"]
    assert not list(tmp_path.glob("o_*"))
    # the same file is a source document when its suffix is asked for
    assert (
        run_tool(
            [
                "--input",
                tmp_path / "data.xyz",
                "--output-prefix",
                tmp_path / "o",
                "--extensions",
                ".xyz",
                "--workers",
                0,
            ],
            codegen_tokenizer_dir,
        )[0]
        == 0
    )


@pytest.mark.parametrize("case", ["all skipped", "empty file", "empty folder", "empty parquet"])
def test_zero_documents_is_an_error(tmp_path, codegen_tokenizer_dir, capsys, case):
    if case == "all skipped":
        write_jsonl(tmp_path / "in.jsonl", [b"not json\n", b'{"text": ""}\n'])
        inp, why = (
            tmp_path / "in.jsonl",
            (
                "all 2 records were skipped (1 empty document, 1 malformed JSON); "
                f"first: {tmp_path / 'in.jsonl'}:1: Expecting value: line 1 column 1 (char 0)"
            ),
        )
    elif case == "empty file":
        write_jsonl(tmp_path / "in.jsonl", [])
        inp, why = tmp_path / "in.jsonl", "the inputs hold no records"
    elif case == "empty folder":
        (tmp_path / "src").mkdir()
        inp, why = tmp_path / "src", "the inputs hold no records"
    else:
        pa = pytest.importorskip("pyarrow")
        write_parquet(tmp_path / "in.parquet", {"text": pa.array([], pa.string())})
        inp, why = tmp_path / "in.parquet", "the inputs hold no records"
    rc, _ = run_tool(["--input", inp, "--output-prefix", tmp_path / "o", "--workers", 0], codegen_tokenizer_dir)
    err = capsys.readouterr().err
    assert rc == 1
    assert f"error: no documents: {why}\nno output was written\n" in err
    assert not list(tmp_path.glob("o_*"))


def test_stale_temporaries_of_dead_runs_removed(tmp_path, codegen_tokenizer_dir, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its PID names no process (unless reused at once: then its files are kept)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x = 1"}])
    stale = [tmp_path / f"o_text_document.{s}.tmp-{dead.pid}" for s in ("bin", "idx")]
    live = tmp_path / "o_text_document.bin.tmp-1"  # PID 1 is alive: maybe a run in progress, kept
    other = tmp_path / "other_text_document.bin.tmp-999999999"  # another prefix: not ours to judge
    for p in stale + [live, other]:
        p.write_bytes(b"partial")
    rc, _ = run_tool(
        ["--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o", "--workers", 0], codegen_tokenizer_dir
    )
    err = capsys.readouterr().err
    assert rc == 0
    for p in stale:
        assert not p.exists() and f"removed {p} (left by a run that no longer exists)" in err
    assert live.exists() and other.exists()


STALL = """
import sys
from megaphi.cli import preprocess_data
from megaphi.data import preprocess as pp
real = pp.iter_batches
def stalled(*a, **k):
    for i, b in enumerate(real(*a, **k)):
        yield b
        if i == 0:
            open(sys.argv[2], "w").close()
            sys.stdin.read()  # blocks until the test signals this process
pp.iter_batches = stalled
sys.exit(preprocess_data.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("sig,workers", [(signal.SIGTERM, 0), (signal.SIGTERM, 2), (signal.SIGINT, 0)])
def test_signal_mid_run_removes_temporaries(tmp_path, codegen_tokenizer_dir, sig, workers):
    """Stalled after its first batch (deterministically, no timing), then signalled: exit 128 + signal
    number and no file left, for every worker count (--workers 0 once reset SIGTERM: exit 143, temp left)."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"v = {i}\n"} for i in range(10)])
    marker = tmp_path / "stalled"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            STALL,
            TOOL,
            str(marker),
            "--input",
            str(tmp_path / "a.jsonl"),
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer",
            str(codegen_tokenizer_dir),
            "--workers",
            str(workers),
            "--batch-size",
            "2",
            "--quiet",
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300  # a hang guard, not a timing assertion
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the tool never reached its first batch"
            time.sleep(0.05)
        assert list(tmp_path.glob("o_text_document.bin.tmp-*"))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
    assert f"interrupted by {name}; no output was written" in err
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "stalled"]


def _children(pid):
    from megaphi.training.launcher_watch import _proc_stat

    return [
        int(entry)
        for entry in os.listdir("/proc")
        if entry.isdigit() and (_proc_stat(int(entry)) or ("", None))[1] == pid
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_workers_exit_quietly_when_the_main_process_is_killed(tmp_path, codegen_tokenizer_dir):
    """kill -9 of the main process while a worker tokenizes a large batch: the workers go away at once and
    print nothing (they used to finish the batch, then die of a BrokenPipeError traceback)."""
    line = "def function_%d(argument):\n    return [value * 2 for value in range(argument)]  # doubled\n"
    write_jsonl(tmp_path / "a.jsonl", [{"text": "".join(line % (i * 40 + j) for j in range(40))} for i in range(2000)])
    marker = tmp_path / "stalled"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            STALL,
            TOOL,
            str(marker),
            "--input",
            str(tmp_path / "a.jsonl"),
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer",
            str(codegen_tokenizer_dir),
            "--workers",
            "2",
            "--batch-size",
            "2000",
            "--quiet",
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300  # hang guards, not timing assertions
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the tool never reached its first batch"
            time.sleep(0.05)
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        while any(_state(w) not in ("Z", None) for w in workers):
            assert time.monotonic() < deadline, "workers outlived the main process"
            time.sleep(0.05)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def _state(pid):
    from megaphi.training.launcher_watch import _proc_stat

    stat = _proc_stat(pid)
    return None if stat is None else stat[0]

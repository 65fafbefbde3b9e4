"""tools/preprocess_data.py --json-keys: a wrong or non-text key is one line naming the key and the
columns/keys the input has (never a 0-document dataset with exit 0); bytes columns are UTF-8 text."""

import pytest

from test_preprocess_data import expected_files, run_tool, write_jsonl
from test_preprocess_inputs import ref_tok, save_hf, write_parquet  # noqa: F401 (ref_tok: a fixture)

ROWS = [{"content": f"x{i} = {i}\n", "size": 7 + i} for i in range(60)]


def _error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "no output was written" in err
    return lines[0]


@pytest.mark.parametrize("kind", ["parquet", "dataset"])
def test_missing_column_names_the_key_and_the_columns(tmp_path, codegen_tokenizer_dir, capsys, kind):
    columns = {"content": [r["content"] for r in ROWS], "size": [r["size"] for r in ROWS]}
    path = tmp_path / ("in.parquet" if kind == "parquet" else "saved")
    write_parquet(path, columns) if kind == "parquet" else save_hf(path, columns)
    for keys in (["contnet"], []):  # a typo, and the default `text`
        rc, _ = run_tool(
            [
                "--input",
                path,
                "--output-prefix",
                tmp_path / "o",
                "--workers",
                0,
                *(["--json-keys", *keys] if keys else []),
            ],
            codegen_tokenizer_dir,
        )
        line = _error(capsys)
        assert rc == 1
        key = keys[0] if keys else "text"
        assert f"--json-keys {key}: {path} has no column '{key}' (columns: content, size)" in line, line
    assert not list(tmp_path.glob("o_*"))


def test_missing_jsonl_key_names_the_key_and_the_record_keys(tmp_path, codegen_tokenizer_dir, capsys):
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    rc, _ = run_tool(
        ["--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o", "--workers", 1, "--json-keys", "contnet"],
        codegen_tokenizer_dir,
    )
    line = _error(capsys)
    assert rc == 1
    assert "no documents: all 60 records were skipped (60 missing key)" in line, line
    assert f"{tmp_path / 'in.jsonl'}:1: no key 'contnet' (keys: content, size)" in line, line
    assert not list(tmp_path.glob("o_*"))


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "dataset"])
def test_non_text_second_key_is_an_error_not_an_empty_dataset(tmp_path, codegen_tokenizer_dir, capsys, kind):
    columns = {"content": [r["content"] for r in ROWS], "size": [r["size"] for r in ROWS]}
    path = tmp_path / {"jsonl": "in.jsonl", "parquet": "in.parquet", "dataset": "saved"}[kind]
    if kind == "jsonl":
        write_jsonl(path, ROWS)
    elif kind == "parquet":
        write_parquet(path, columns)
    else:
        save_hf(path, columns)
    rc, _ = run_tool(
        ["--input", path, "--output-prefix", tmp_path / "o", "--workers", 0, "--json-keys", "content", "size"],
        codegen_tokenizer_dir,
    )
    line = _error(capsys)
    assert rc == 1
    assert line.startswith("error: --json-keys size: "), line
    if kind == "jsonl":
        assert "no documents under key 'size': all 60 records were skipped (60 non-string value)" in line, line
        assert f"{path}:1: key 'size' holds int" in line
    else:
        assert f"{path}: column 'size' holds int64, not text" in line, line
    assert not list(tmp_path.glob("o_*"))


def test_bytes_columns_are_utf8_text(tmp_path, codegen_tokenizer_dir, ref_tok, capsys):  # noqa: F811 (the imported fixture)
    docs = ["def f():\n    return 'é'\n", "x = 1\n", "print('日本')\n"]
    raw = [d.encode() for d in docs]
    write_parquet(tmp_path / "b.parquet", {"content": raw[:2] + [b"\xff\xfe bad\n"]})
    save_hf(tmp_path / "saved", {"content": raw[2:]})
    rc, _ = run_tool(
        [
            "--input",
            tmp_path / "b.parquet",
            tmp_path / "saved",
            "--output-prefix",
            tmp_path / "o",
            "--workers",
            0,
            "--json-keys",
            "content",
        ],
        codegen_tokenizer_dir,
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"skipped undecodable bytes at {tmp_path / 'b.parquet'}:row 2: key 'content': byte 0" in captured.err
    got = ((tmp_path / "o_content_document.bin").read_bytes(), (tmp_path / "o_content_document.idx").read_bytes())
    assert got == expected_files([ref_tok(d) for d in docs])


def test_summary_on_stdout_warnings_on_stderr(tmp_path, codegen_tokenizer_dir, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "a = 1\n"}, b"not json\n"])
    rc, _ = run_tool(
        ["--input", tmp_path / "in.jsonl", "--output-prefix", tmp_path / "o", "--workers", 0], codegen_tokenizer_dir
    )
    captured = capsys.readouterr()
    assert rc == 0
    assert "done: 1 documents" in captured.out and "wrote " in captured.out
    assert "skipped 1 records (1 malformed JSON)" in captured.out
    assert "warning: skipped malformed JSON at" in captured.err and "done:" not in captured.err

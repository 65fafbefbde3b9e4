"""megaphi.tokenizer against the codegen-350M-mono files (phi-1's tokenizer) and a trained BPE."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from megaphi.tokenizer import load_tokenizer, pad_vocab_size

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELLO = "def hello_world():\n    print('hi')\n\treturn 1\n"
# Expected ids given in the issue (from the Hugging Face CodeGen tokenizer).
HELLO_IDS = [4299, 23748, 62, 6894, 33529, 198, 50284, 4798, 10786, 5303, 11537, 198, 197, 7783, 352, 198]


@pytest.fixture
def vocab_merges_dir(codegen_tokenizer_dir, tmp_path):
    """The same tokenizer given as vocab.json + merges.txt + added_tokens.json (no tokenizer.json)."""
    d = tmp_path / "vm"
    d.mkdir()
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        shutil.copy(codegen_tokenizer_dir / name, d / name)
    return d


def test_codegen_ids_from_tokenizer_json(codegen_tokenizer_dir):
    tok = load_tokenizer(str(codegen_tokenizer_dir / "tokenizer.json"))
    assert tok.encode(HELLO) == HELLO_IDS
    assert tok.vocab_size == 50295
    assert tok.eod_id == 50256
    assert tok.decode(HELLO_IDS) == HELLO


def test_codegen_folder_forms_agree(codegen_tokenizer_dir, vocab_merges_dir):
    from_json = load_tokenizer(str(codegen_tokenizer_dir))  # folder with tokenizer.json
    from_files = load_tokenizer(str(vocab_merges_dir))  # vocab.json + merges.txt + added_tokens.json
    assert from_files.encode(HELLO) == HELLO_IDS
    assert from_files.vocab_size == 50295 and from_files.eod_id == 50256
    texts = [
        HELLO,
        "  Hello World",  # dotnet/machinelearning CodeGenTests: [50286, 15496, 2159]
        "class A:\n        def f(self):\n\t\t\treturn {'k': [1, 2.5e-3]}\n" + " " * 40 + "x",
        "héllo wörld 日本語 🙂 \u00a0\r\n",
        "a<|endoftext|>b",
        "",
    ]
    assert from_files.encode_batch(texts) == from_json.encode_batch(texts)
    assert from_json.encode("  Hello World") == [50286, 15496, 2159]
    for t in texts:
        assert from_files.decode(from_files.encode(t)) == t


def test_matches_transformers_codegen_tokenizer(codegen_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(codegen_tokenizer_dir))
    tok = load_tokenizer(str(codegen_tokenizer_dir))
    text = open(os.path.join(REPO, "megaphi", "tokenizer.py"), encoding="utf-8").read()
    assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]


def test_no_bos_and_literal_eod(codegen_tokenizer_dir):
    tok = load_tokenizer(str(codegen_tokenizer_dir))
    assert tok.encode("x")[0] != tok.eod_id and len(tok.encode("x")) == 1
    assert tok.encode("") == []
    # Documented behaviour: a literal <|endoftext|> in text is the EOD token.
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]


def test_padded_vocab_size(codegen_tokenizer_dir):
    assert pad_vocab_size(50295, 128, 1) == 50304
    assert pad_vocab_size(50295, 1024, 1) == 51200  # phi-1's embedding size
    assert pad_vocab_size(50295, 128, 8) == 51200
    assert pad_vocab_size(50304, 128, 1) == 50304
    tok = load_tokenizer(str(codegen_tokenizer_dir), make_vocab_size_divisible_by=256, tensor_model_parallel_size=4)
    assert tok.padded_vocab_size == 51200
    assert load_tokenizer(str(codegen_tokenizer_dir)).padded_vocab_size == 50304
    with pytest.raises(ValueError):
        pad_vocab_size(10, 0)


def test_save_round_trip(codegen_tokenizer_dir, tmp_path):
    tok = load_tokenizer(str(codegen_tokenizer_dir))
    path = tok.save(str(tmp_path / "out"))
    assert load_tokenizer(path).encode(HELLO) == HELLO_IDS


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_tokenizer(str(tmp_path / "missing" / "tok.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load tokenizer file"):
        load_tokenizer(str(tmp_path / "bad.json"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_tokenizer("Salesforce/codegen-350M-mono")


def test_missing_eod_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match="no '<\\|endoftext\\|>' token"):
        load_tokenizer(str(tmp_path / "t.json"))


def test_train_tokenizer_tool(tmp_path):
    corpus = tmp_path / "c.jsonl"
    srcs = sorted(p for p in os.listdir(os.path.join(REPO, "megaphi")) if p.endswith(".py"))
    with open(corpus, "w") as f:
        for p in srcs:
            f.write(json.dumps({"text": open(os.path.join(REPO, "megaphi", p)).read()}) + "\n")
        f.write("not json\n")
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    (src_dir / "m.py").write_text("def spam(eggs):\n    return eggs * 2\n")
    out = tmp_path / "tok"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "train_tokenizer.py"),
            "--input",
            str(corpus),
            str(src_dir),
            "--vocab-size",
            "400",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(str(out))
    assert 257 < tok.vocab_size <= 400
    assert tok.id_to_token(tok.eod_id) == "<|endoftext|>"
    text = "def spam(eggs):\n    return 'ünïcode' # any bytes\x00\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level: every string round-trips
    assert len(ids) < len(text.encode())  # it learned merges
    assert tok.encode("a<|endoftext|>")[-1] == tok.eod_id

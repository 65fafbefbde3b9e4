"""Tokenizer: a thin wrapper over a Hugging Face ``tokenizers`` (Rust, "fast") tokenizer.

``load_tokenizer(name_or_path)`` accepts
  * a ``tokenizer.json`` file,
  * a folder holding ``tokenizer.json``, or the GPT-2 style ``vocab.json`` + ``merges.txt``
    (+ ``added_tokens.json``), from which a byte-level BPE is assembled,
  * a Hugging Face Hub name (default ``Salesforce/codegen-350M-mono``, phi-1's tokenizer) when online.

The wrapper never adds BOS/EOS: documents get the EOD token (``<|endoftext|>``) only where
tools/preprocess_data.py appends it. A literal ``<|endoftext|>`` inside a text is a special token, so
it encodes to the EOD id (the Hugging Face default for this tokenizer, what phi-1 saw).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Sequence

DEFAULT_TOKENIZER = "Salesforce/codegen-350M-mono"
EOD_TOKEN = "<|endoftext|>"


def pad_vocab_size(
    vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """Smallest multiple of divisible_by * TP that is >= vocab_size (Megatron's padding rule)."""
    multiple = int(make_vocab_size_divisible_by) * int(tensor_model_parallel_size)
    if multiple <= 0:
        raise ValueError(f"make_vocab_size_divisible_by * tensor_model_parallel_size must be positive, got {multiple}")
    return -(-int(vocab_size) // multiple) * multiple


class MegaphiTokenizer:
    """Encode/decode with an HF ``tokenizers.Tokenizer``; exposes vocab size, EOD id, padded vocab size."""

    def __init__(
        self,
        tokenizer,
        name_or_path: str = "",
        make_vocab_size_divisible_by: int = 128,
        tensor_model_parallel_size: int = 1,
        eod_token: str = EOD_TOKEN,
    ):
        self._tok = tokenizer
        # Whatever tokenizer.json says, we never truncate, pad or add special tokens.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.name_or_path = str(name_or_path)
        self.eod_token = eod_token
        eod = self._tok.token_to_id(eod_token)
        if eod is None:
            raise ValueError(
                f"tokenizer {self.name_or_path or '<in memory>'} has no {eod_token!r} token "
                f"(needed as the end-of-document token)"
            )
        self.eod_id = int(eod)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.make_vocab_size_divisible_by = make_vocab_size_divisible_by
        self.tensor_model_parallel_size = tensor_model_parallel_size
        self.padded_vocab_size = pad_vocab_size(
            self.vocab_size, make_vocab_size_divisible_by, tensor_model_parallel_size
        )

    # Megatron-style aliases
    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        texts = list(texts)
        encode = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch  # fast: no offsets
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(int(token_id))

    def save(self, directory: str) -> str:
        """Writes ``directory/tokenizer.json`` (atomically) and returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "tokenizer.json")
        tmp = path + f".tmp-{os.getpid()}"
        self._tok.save(tmp)
        os.replace(tmp, path)
        return path

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"MegaphiTokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id}, "
            f"padded_vocab_size={self.padded_vocab_size})"
        )


def _byte_level_bpe_from_files(folder: str, vocab_path: Optional[str] = None, merges_path: Optional[str] = None):
    """A GPT-2/CodeGen byte-level BPE from vocab.json + merges.txt (+ added_tokens.json) of a folder, or
    from two files named otherwise (Megatron's --vocab-file/--merge-file)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab_path = vocab_path or os.path.join(folder, "vocab.json")
    merges_path = merges_path or os.path.join(folder, "merges.txt")
    model = models.BPE.from_file(vocab_path, merges_path)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    added = {}
    added_path = os.path.join(folder, "added_tokens.json")
    if os.path.exists(added_path):
        with open(added_path, encoding="utf-8") as f:
            added = json.load(f)
        if not isinstance(added, dict):
            raise ValueError(f"{added_path}: expected a JSON object mapping token -> id")
    special = {EOD_TOKEN}
    special_map = os.path.join(folder, "special_tokens_map.json")
    if os.path.exists(special_map):
        with open(special_map, encoding="utf-8") as f:
            for v in json.load(f).values():
                special.add(v["content"] if isinstance(v, dict) else v)
    # The EOD token is in vocab.json already; registering it as special makes a literal match it whole.
    for content in sorted(special):
        if tok.token_to_id(content) is not None:
            tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    # Added tokens get the next free ids in the order they are added: add them by increasing id and
    # check each lands where added_tokens.json says.
    for content, want in sorted(added.items(), key=lambda kv: kv[1]):
        if content in special:
            tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        else:
            tok.add_tokens([AddedToken(content, normalized=True)])
        got = tok.token_to_id(content)
        if got != want:
            raise ValueError(
                f"{added_path}: token {content!r} should have id {want} but got {got} "
                f"(ids must follow vocab.json without gaps)"
            )
    return tok


def _load_backend(name_or_path: str):
    from tokenizers import Tokenizer

    path = os.path.expanduser(str(name_or_path))
    if os.path.isfile(path):
        try:
            return Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exception for parse errors
            raise ValueError(f"cannot load tokenizer file {path}: {e}") from None
    if os.path.isdir(path):
        tj = os.path.join(path, "tokenizer.json")
        if os.path.isfile(tj):
            return _load_backend(tj)
        if os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
            return _byte_level_bpe_from_files(path)
        raise FileNotFoundError(f"tokenizer folder {path} has neither tokenizer.json nor vocab.json + merges.txt")
    looks_like_path = path.startswith((".", "/", "~")) or path.endswith(".json") or path.count("/") > 1
    if looks_like_path:
        raise FileNotFoundError(f"tokenizer {name_or_path!r}: no such file or folder")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise OSError(
            f"tokenizer {name_or_path!r} is not a local file or folder, and HF_HUB_OFFLINE is set so it "
            f"cannot be downloaded from the Hugging Face Hub. Pass a tokenizer.json or a folder "
            f"(e.g. one written by tools/train_tokenizer.py)."
        )
    try:
        return Tokenizer.from_pretrained(path)
    except Exception as e:
        raise OSError(
            f"tokenizer {name_or_path!r} is not a local file or folder, and downloading it from the "
            f"Hugging Face Hub failed (offline?): {e}. Pass a tokenizer.json or a folder with "
            f"tokenizer.json or vocab.json + merges.txt (e.g. one written by tools/train_tokenizer.py)."
        ) from None


def load_tokenizer(
    name_or_path: str = DEFAULT_TOKENIZER, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> MegaphiTokenizer:
    """Loads a tokenizer from a tokenizer.json, a folder, or a Hub name; see the module docstring."""
    backend = _load_backend(name_or_path)
    return MegaphiTokenizer(backend, name_or_path, make_vocab_size_divisible_by, tensor_model_parallel_size)


def load_bpe_files(
    vocab_file: str, merge_file: str, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> MegaphiTokenizer:
    """Megatron's GPT2BPETokenizer: a byte-level BPE from a vocab.json and a merges.txt (any names; the
    added_tokens.json and special_tokens_map.json beside the vocabulary are read too)."""
    try:
        backend = _byte_level_bpe_from_files(os.path.dirname(os.path.abspath(vocab_file)), vocab_file, merge_file)
    except Exception as e:  # tokenizers raises plain Exception for unreadable vocab/merges files
        raise ValueError(f"cannot build a byte-level BPE from {vocab_file} + {merge_file}: {e}") from None
    return MegaphiTokenizer(backend, vocab_file, make_vocab_size_divisible_by, tensor_model_parallel_size)

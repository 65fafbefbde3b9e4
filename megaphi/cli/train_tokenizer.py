"""Train a byte-level BPE tokenizer (GPT-2 style, with <|endoftext|>) on a corpus, offline.

Reads the same inputs as tools/preprocess_data.py (JSONL, .jsonl.gz, parquet, HF datasets, source trees) and writes
OUTPUT_DIR/tokenizer.json, loadable with --tokenizer OUTPUT_DIR everywhere in megaphi.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 4096 --output-dir data/tokenizer
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Iterator, List, Optional

from megaphi.cli import add_version_flag
from megaphi.data.corpus_decoding import decode_batch
from megaphi.data.corpus_readers import iter_batches, parse_extensions

EOD = "<|endoftext|>"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaphi-train-tokenizer", description=__doc__.split("\n\n")[0])
    add_version_flag(p)
    p.add_argument(
        "--input", nargs="+", required=True, help="JSONL (.jsonl, .jsonl.gz) files, source directories or files"
    )
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys holding text (default: text)")
    p.add_argument("--extensions", default=".py", help="suffixes of source files taken from directories (default: .py)")
    p.add_argument("--output-dir", required=True, help="folder to write tokenizer.json into")
    p.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary incl. 256 bytes and <|endoftext|>")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merged pair")
    p.add_argument("--max-documents", type=int, default=None, help="train on the first N documents only")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT_DIR/tokenizer.json")
    p.add_argument("--quiet", action="store_true")
    return p


def iter_texts(
    inputs: List[str], keys: List[str], extensions: tuple, limit: Optional[int], stats: dict
) -> Iterator[str]:
    n = 0
    for batch in iter_batches(inputs, extensions, 256, keys=keys):  # parquet/datasets: read the keys' columns
        texts, skipped, nbytes = decode_batch(batch, keys)
        stats["skipped"] += len(skipped)
        stats["bytes"] += nbytes
        for key in keys:
            for t in texts[key]:
                if limit is not None and n >= limit:
                    return
                n += 1
                stats["documents"] = n
                yield t


def train(args) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if args.vocab_size < 258:
        raise ValueError("--vocab-size must be at least 258 (256 bytes + <|endoftext|> + one merge)")
    for path in args.input:
        if not os.path.exists(path):
            raise ValueError(f"--input {path}: no such file or directory")
    out = os.path.join(args.output_dir, "tokenizer.json")
    if os.path.exists(out) and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=not args.quiet,
    )
    stats = {"documents": 0, "skipped": 0, "bytes": 0}
    t0 = time.time()
    tok.train_from_iterator(
        iter_texts(args.input, args.json_keys, parse_extensions(args.extensions), args.max_documents, stats),
        trainer=trainer,
    )
    if stats["documents"] == 0:
        raise ValueError("no documents found in the inputs")
    os.makedirs(args.output_dir, exist_ok=True)
    tmp = out + f".tmp-{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out)
    print(
        f"trained a byte-level BPE of {tok.get_vocab_size()} tokens (<|endoftext|> = {tok.token_to_id(EOD)}) on "
        f"{stats['documents']:,} documents ({stats['bytes'] / 1e6:.1f} MB, {stats['skipped']} skipped) in "
        f"{time.time() - t0:.1f} s -> {out}"
    )  # the result: stdout
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

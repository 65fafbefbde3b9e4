"""Corpus readers of the preprocessing pipeline (megaphi/data/preprocess.py) and the tokenizer trainer:
inputs -> batches of raw records, in input order (decoded into validated texts by corpus_decoding.py).

Input kinds (``--input``, in the order given):

* JSONL (``.jsonl``/``.json``, ``.gz`` too): one JSON object per line, read line by line;
* parquet (``.parquet``): streamed by record batch (pyarrow reads one row group at a time);
* a Hugging Face dataset saved with ``save_to_disk`` (a folder holding ``state.json`` or
  ``dataset_dict.json``), read with ``datasets.load_from_disk`` (memory-mapped arrow);
* ``hf:NAME``: ``datasets.load_dataset(NAME, streaming=True)`` (the Hub when online, or a local folder
  of data files);
* a folder of source files (one document per file, sorted full-path order) or one source file.

Main process: ``iter_batches`` yields ``Batch``es (raw lines, file paths or row dicts) with the input
bytes each accounts for (the progress bar). Workers: ``decode_batch`` (megaphi/data/corpus_decoding.py)
turns a batch into texts per key and the skipped records as (reason, location). Nothing holds more
than one record above ``max_document_bytes``: longer JSONL lines are skipped while read, longer files are not read, longer
values are replaced by an ``Oversize`` marker before they reach a worker.
"""

from __future__ import annotations

import glob
import gzip
import os
import stat
from typing import Iterator, List, NamedTuple, Optional, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
HF_PREFIX = "hf:"
DEFAULT_MAX_DOCUMENT_BYTES = 16 << 20


class CorpusError(ValueError):
    """An input that cannot be used at all (unknown type, missing dependency, unloadable dataset)."""


class HFOptions(NamedTuple):
    split: str = "train"
    subset: Optional[str] = None  # load_dataset's `name` (a configuration)
    data_dir: Optional[str] = None


class Batch(NamedTuple):
    kind: str  # "jsonl": raw lines; "files": paths; "records": row dicts; "error": unreadable; "skip": (reason, where)
    source: str  # file or dataset name (jsonl/records/error), "" otherwise
    first_line: int  # line number (jsonl, 1-based) or row index (records, 0-based) of items[0]
    items: list
    size: int = 0  # input bytes (on disk) this batch accounts for: the progress bar's unit


class Oversize(NamedTuple):
    """Stands for a record longer than max_document_bytes (its bytes are never kept)."""

    nbytes: int


# ----------------------------------------------------------------------------- classifying inputs
def parse_extensions(spec: str) -> tuple:
    exts = tuple(e if e.startswith(".") else "." + e for e in (s.strip() for s in spec.split(",")) if e)
    if not exts:
        raise ValueError("--extensions is empty")
    return exts


def is_jsonl(path: str) -> bool:
    return path.endswith(JSONL_SUFFIXES)


def is_parquet(path: str) -> bool:
    return path.endswith(PARQUET_SUFFIXES)


def is_saved_hf_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def input_kind(path: str, extensions: tuple) -> str:
    """ "hub", "hf_disk", "tree", "jsonl", "parquet", "source", "special" (not a regular file: skipped).
    Raises CorpusError for a missing path or a file of unknown type."""
    if path.startswith(HF_PREFIX):
        return "hub"
    try:
        st = os.stat(path)
    except OSError as e:
        raise CorpusError(f"--input {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        return "hf_disk" if is_saved_hf_dataset(path) else "tree"
    if not stat.S_ISREG(st.st_mode):
        return "special"
    if is_jsonl(path):
        return "jsonl"
    if is_parquet(path):
        return "parquet"
    if path.endswith(extensions):
        return "source"
    raise CorpusError(
        f"--input {path}: unknown file type (expected {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}, "
        f"a folder, hf:NAME, or a source file ending with --extensions {','.join(extensions)})"
    )


def _hf_disk_split_dir(path: str, split: str) -> str:
    return os.path.join(path, split) if os.path.isfile(os.path.join(path, "dataset_dict.json")) else path


def input_size(path: str, extensions: tuple, hf: HFOptions = HFOptions()) -> Optional[int]:
    """Bytes on disk the input accounts for in the progress bar, None when unknown (folders of sources
    are not walked twice; Hub datasets are streamed)."""
    kind = input_kind(path, extensions)
    if kind in ("hub", "tree"):
        return None
    if kind == "special":
        return 0
    if kind == "hf_disk":
        return sum(
            os.path.getsize(f)
            for f in glob.glob(os.path.join(glob.escape(_hf_disk_split_dir(path, hf.split)), "*.arrow"))
        )
    return os.path.getsize(path)


# ----------------------------------------------------------------------------- batches
def walk_sorted(root: str, extensions: tuple, errors: list) -> Iterator[str]:
    """Files under root ending with one of extensions, in sorted full-path order, without listing the
    whole tree at once (a directory sorts as its name + "/", which gives full-path order)."""
    try:
        entries = list(os.scandir(root))
    except OSError as e:
        errors.append(f"{root}: {e.strerror or e}")
        return
    keyed = []
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_dir = False
        keyed.append((entry.name + "/" if is_dir else entry.name, entry.path, is_dir))
    del entries
    for _, path, is_dir in sorted(keyed):
        if is_dir:
            yield from walk_sorted(path, extensions, errors)
        elif path.endswith(extensions):
            yield path


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def iter_batches(
    inputs: List[str],
    extensions: tuple,
    batch_size: int,
    batch_bytes: int = 1 << 62,
    keys: Sequence[str] = ("text",),
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    hf: HFOptions = HFOptions(),
) -> Iterator[Batch]:
    """Batches of raw records (at most batch_size records or about batch_bytes bytes), in input order.
    Opening/reading failures become "error" batches; non-regular files "skip" batches."""
    for path in inputs:
        kind = input_kind(path, extensions)
        if kind == "tree":
            yield from _tree_batches(path, extensions, batch_size, batch_bytes)
        elif kind == "jsonl":
            yield from _jsonl_batches(path, batch_size, batch_bytes, max_document_bytes)
        elif kind == "parquet":
            yield from _parquet_batches(path, list(keys), batch_size, batch_bytes, max_document_bytes)
        elif kind == "hf_disk":
            yield from _hf_disk_batches(path, list(keys), batch_size, batch_bytes, max_document_bytes, hf)
        elif kind == "hub":
            yield from _hub_batches(path, list(keys), batch_size, batch_bytes, max_document_bytes, hf)
        elif kind == "special":
            yield Batch("skip", "", 0, [("not a regular file", path)])
        else:
            yield Batch("files", "", 0, [path], _file_size(path))


def _tree_batches(path, extensions, batch_size, batch_bytes):
    errors: list = []
    items: list = []
    size = 0
    for f in walk_sorted(path, extensions, errors):
        while errors:
            yield Batch("error", errors.pop(0), 0, [])
        items.append(f)
        size += _file_size(f)
        if len(items) >= batch_size or size >= batch_bytes:
            yield Batch("files", "", 0, items, size)
            items, size = [], 0
    while errors:
        yield Batch("error", errors.pop(0), 0, [])
    if items:
        yield Batch("files", "", 0, items, size)


def _bounded_lines(f, limit: int):
    """Lines of a binary file; a line over `limit` bytes (newline excluded) is read in chunks and
    yielded as Oversize(its length), so it never sits in memory whole."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            n = len(line)
            while True:
                chunk = f.readline(1 << 20)
                n += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield Oversize(n)
        else:
            yield line


def _jsonl_batches(path: str, batch_size: int, batch_bytes: int, limit: int) -> Iterator[Batch]:
    line_no, items, first, size, counted = 0, [], 1, 0, 0
    try:
        with open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw
            with f:
                for line in _bounded_lines(f, limit):
                    line_no += 1
                    items.append(line)
                    size += line.nbytes if isinstance(line, Oversize) else len(line)
                    if len(items) >= batch_size or size >= batch_bytes:
                        pos = raw.tell()
                        yield Batch("jsonl", path, first, items, pos - counted)
                        items, first, size, counted = [], line_no + 1, 0, pos
                end = os.fstat(raw.fileno()).st_size
    except (OSError, EOFError, ValueError) as e:  # unreadable, truncated or corrupt gzip
        if items:
            yield Batch("jsonl", path, first, items)
            items = []
        where = f"{path}:{line_no + 1}" if line_no else path
        yield Batch("error", f"{where}: {getattr(e, 'strerror', None) or e}", 0, [])
        return
    if items or end > counted:
        yield Batch("jsonl", path, first, items, end - counted)


def _value(v, limit: int):
    """A record's value as shipped to a worker: strings over `limit` UTF-8 bytes (and bytes values
    over `limit` bytes) become Oversize."""
    if isinstance(v, (bytes, bytearray)) and len(v) > limit:
        return Oversize(len(v))
    if isinstance(v, str) and len(v) > limit // 4:  # below that, 4 bytes per character still fit
        n = len(v.encode("utf-8", "surrogatepass"))
        if n > limit:
            return Oversize(n)
    return v


def _row_batches(source, columns: dict, n: int, first: int, batch_size, batch_bytes, limit, share) -> Iterator[Batch]:
    """Row dicts (only the columns present) of n rows starting at row `first`, cut into batches;
    `share(rows)` gives the input bytes that many rows account for."""
    rows, size, start = [], 0, first
    for i in range(n):
        row = {k: _value(col[i], limit) for k, col in columns.items()}
        rows.append(row)
        size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row.values())
        if len(rows) >= batch_size or size >= batch_bytes:
            yield Batch("records", source, start, rows, share(len(rows)))
            start += len(rows)
            rows, size = [], 0
    if rows:
        yield Batch("records", source, start, rows, share(len(rows)))


def _shares(total_bytes: int, total_rows: int):
    """share(rows): bytes for the next `rows` rows, so that all shares add up to total_bytes exactly."""
    state = {"rows": 0, "bytes": 0}

    def share(rows: int) -> int:
        state["rows"] += rows
        upto = total_bytes * state["rows"] // max(total_rows, 1)
        out, state["bytes"] = upto - state["bytes"], upto
        return out

    return share


def describe_names(names) -> str:
    """Column or key names for a message: the first 20, then how many more."""
    names = list(names)
    shown = ", ".join(str(n) for n in names[:20])
    return shown + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "") if names else "none"


def _is_text_type(arrow_type) -> bool:
    """Arrow types whose values are text: strings, bytes (decoded as UTF-8), all-null, or a dictionary
    of those (pandas categoricals)."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        return _is_text_type(arrow_type.value_type)
    checks = (
        "is_string",
        "is_large_string",
        "is_string_view",
        "is_binary",
        "is_large_binary",
        "is_binary_view",
        "is_fixed_size_binary",
        "is_null",
    )
    return any(getattr(pa.types, name, lambda t: False)(arrow_type) for name in checks)


def check_text_columns(source: str, keys: List[str], schema) -> None:
    """A whole-input check (parquet, saved and Hub datasets know their columns): every --json-keys key
    is a column holding text; otherwise one line naming the key, the input and its columns."""
    for key in keys:
        if key not in schema.names:
            raise CorpusError(
                f"--json-keys {key}: {source} has no column {key!r} (columns: {describe_names(schema.names)})"
            )
        arrow_type = schema.field(key).type
        if not _is_text_type(arrow_type):
            raise CorpusError(
                f"--json-keys {key}: {source}: column {key!r} holds {arrow_type}, not text "
                f"(columns: {describe_names(schema.names)})"
            )


def _parquet_batches(path: str, keys: List[str], batch_size, batch_bytes, limit) -> Iterator[Batch]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"--input {path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    row = 0
    try:
        pf = pq.ParquetFile(path)
        check_text_columns(path, keys, pf.schema_arrow)
        cols = list(keys)
        share = _shares(os.path.getsize(path), pf.metadata.num_rows)
        for g in range(pf.metadata.num_row_groups):  # one row group in memory at a time
            for rb in pf.iter_batches(batch_size=max(batch_size, 1), row_groups=[g], columns=cols, use_threads=False):
                yield from _row_batches(path, rb.to_pydict(), rb.num_rows, row, batch_size, batch_bytes, limit, share)
                row += rb.num_rows
    except CorpusError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:
        where = f"{path}:row {row}" if row else path
        yield Batch("error", f"{where}: {e}", 0, [])


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"--input {what}: needs the Hugging Face datasets library (pip install datasets)") from None
    return datasets


def _hf_disk_batches(path: str, keys: List[str], batch_size, batch_bytes, limit, hf: HFOptions) -> Iterator[Batch]:
    datasets = _import_datasets(path)
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - any loader failure is one line naming the folder
        raise CorpusError(f"--input {path}: not a loadable saved dataset: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if hf.split not in ds:
            raise CorpusError(f"--input {path}: no split {hf.split!r} (splits: {', '.join(ds)}); pass --hf-split")
        ds = ds[hf.split]
    check_text_columns(path, keys, ds.data.schema)
    cols = list(keys)
    share = _shares(input_size(path, (), hf) or 0, len(ds))
    row, step = 0, max(batch_size, 1)
    for chunk in ds.select_columns(cols).iter(batch_size=step):
        n = len(chunk[cols[0]])
        yield from _row_batches(path, chunk, n, row, batch_size, batch_bytes, limit, share)
        row += n


def _hub_batches(spec: str, keys: List[str], batch_size, batch_bytes, limit, hf: HFOptions) -> Iterator[Batch]:
    datasets = _import_datasets(spec)
    name = spec[len(HF_PREFIX) :]
    try:
        ds = datasets.load_dataset(name, hf.subset, data_dir=hf.data_dir, split=hf.split, streaming=True)
        features = getattr(ds, "features", None)  # None when the stream's columns are only known per row
        schema = features.arrow_schema if features is not None else None
        it = iter(ds)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, gated, bad split: one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CorpusError(f"--input {spec}: cannot load the dataset: {type(e).__name__}: {msg}") from None
    if schema is not None:
        check_text_columns(spec, keys, schema)
    rows, size, start, row = [], 0, 0, 0
    try:
        for ex in it:
            r = {k: _value(ex[k], limit) for k in keys if k in ex}
            rows.append(r)
            row += 1
            size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in r.values())
            if len(rows) >= batch_size or size >= batch_bytes:
                yield Batch("records", spec, start, rows)
                rows, size, start = [], 0, row
    except Exception as e:  # noqa: BLE001 - a stream that breaks off: the rows before are kept
        if rows:
            yield Batch("records", spec, start, rows)
            rows = []
        yield Batch("error", f"{spec}:row {row}: {type(e).__name__}: {e}", 0, [])
    if rows:
        yield Batch("records", spec, start, rows)

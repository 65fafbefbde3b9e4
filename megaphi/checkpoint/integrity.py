"""Checkpoint integrity: per-file checksums recorded at save, verified at --load; fsync before `latest`.

A save records, in DIR/<tag>/megaphi_meta.json, {"files": {relative path: {"size": bytes, "crc32":
"8 hex digits"}}} for every file of the tag folder except the metadata itself. --load reads `latest`
and the metadata, then checks every listed file (present, same size, same CRC-32) before anything is
handed to DeepSpeed, and turns every failure into one CheckpointError line naming the file.

Why CRC-32 (zlib.crc32, streamed in 16 MiB blocks): the threat is accidental damage (a flipped bit,
a truncated or missing file), not an adversary, and CRC-32 detects every burst error up to 32 bits and
every odd number of flipped bits; it is the fastest hash in the standard library (zlib releases the
GIL on large blocks), several times faster than blake2b or sha256 here (benchmarks/checkpoint_hash.py
prints the table). The size check catches truncation before any hashing.

Work is shared: rank r hashes (and fsyncs) files r, r + world, ... of the sorted file list, so a
save or a verify costs about total bytes / world of reading per rank; the results are all-gathered.

Coverage: the list must name every data file of the folder (check_coverage), since DeepSpeed and
the model loader pick files by name: an unlisted file would be read unverified.

The metadata protects itself (seal_metadata): "metadata_sha256" is the SHA-256 of the canonical JSON
of every other key (json.dumps with sort_keys=True, separators=(",", ":"), ensure_ascii=True), so it
does not depend on how the file is indented. SHA-256 rather than CRC-32 here: one flipped digit can
change several bytes of the canonical text ("1e-3" -> "0.01"), and the cost is nil for a few KiB. A
flip in the key's own name leaves a "megaphi-train-v2" file without it, which is refused too; only
files of the older format (no seal) load unsealed, with a warning.
"""

import errno
import hashlib
import json
import os
import re
import zlib

from .atomic import TMP_INFIX, fsync_dir
from .collective import gather_union, rank_and_world

HASH_NAME = "crc32"
SEAL_NAME = "metadata_sha256"
SEALED_FORMAT = "megaphi-train-v2"  # every metadata of this format carries SEAL_NAME
BLOCK = 16 << 20
# atomic.write_atomic's and the tokenizer's temporary names; ".tmp." those of saves by an older megaphi
TMP_MARKERS = (".tmp.", TMP_INFIX)


class IntegrityError(RuntimeError):
    """One line naming the file and what is wrong with it."""


def file_crc32(path, fsync=False):
    """(size, crc32 hex) of a file, streamed; optionally fsync it while it is open."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
        if fsync:
            os.fsync(f.fileno())
    return size, f"{crc & 0xFFFFFFFF:08x}"


def is_temporary(name):
    return any(marker in name for marker in TMP_MARKERS) or name.endswith(".tmp")


def data_files(tag_dir, meta_name):
    """Sorted relative paths of the checkpoint's data files (metadata and temporaries excluded)."""
    found = []
    for root, dirs, files in os.walk(tag_dir):
        dirs[:] = sorted(d for d in dirs if not is_temporary(d))
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), tag_dir)
            if rel != meta_name and not is_temporary(name):
                found.append(rel)
    return sorted(found)


def remove_temporaries(tag_dir):
    """Stale `*.tmp.PID` / `*.tmp-*` leftovers of an earlier, killed save into the same folder."""
    for root, dirs, files in os.walk(tag_dir):
        for name in files:
            if is_temporary(name):
                try:
                    os.unlink(os.path.join(root, name))
                except FileNotFoundError:
                    pass


def checksum_and_sync(tag_dir, meta_name):
    """Collective. {relative path: {"size", "crc32"}} of the tag folder's data files, each file
    fsynced by the rank that hashed it; then rank 0 fsyncs every folder of the tree."""
    rank, world = rank_and_world()
    files = data_files(tag_dir, meta_name)
    local = {}
    for rel in files[rank::world]:
        size, crc = file_crc32(os.path.join(tag_dir, rel), fsync=True)
        local[rel] = {"size": size, HASH_NAME: crc}
    merged = gather_union(local)
    if rank == 0:
        for root, _, _ in os.walk(tag_dir):
            fsync_dir(root)
    return {rel: merged[rel] for rel in sorted(merged)}


def check_file(tag_dir, rel, expected):
    """None when the file matches `expected`, else what is wrong (one line)."""
    path = os.path.join(tag_dir, rel)
    if not isinstance(expected, dict) or not isinstance(expected.get("size"), int):
        return f"{path}: its checksum entry in the metadata is malformed ({expected!r:.60})"
    if not os.path.isfile(path):
        return f"{path}: missing (the metadata lists it, {expected['size']} bytes)"
    size = os.path.getsize(path)
    if size != expected["size"]:
        kind = "truncated" if size < expected["size"] else "longer than saved"
        return f"{path}: {kind}: {size} bytes, {expected['size']} were saved"
    want = expected.get(HASH_NAME)
    if want is None:
        return None
    try:
        _, got = file_crc32(path)
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror or e})"
    if got != want:
        return f"{path}: corrupted: {HASH_NAME} {got}, {want} was saved (the file changed after the save)"
    return None


def verify_files(tag_dir, files):
    """Collective. Check every file listed in the metadata; raise IntegrityError naming the first
    bad one (the same error on every rank)."""
    if not isinstance(files, dict):
        raise IntegrityError(f"{tag_dir}: the metadata's file list is malformed ({type(files).__name__})")
    rank, world = rank_and_world()
    names = sorted(files)
    local = {}
    for rel in names[rank::world]:
        problem = check_file(tag_dir, rel, files[rel])
        if problem:
            local[rel] = problem
    problems = gather_union(local)
    if problems:
        first = sorted(problems)[0]
        more = f" (and {len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        raise IntegrityError(problems[first] + more)


def check_coverage(tag_dir, files, meta_name, select=None):
    """IntegrityError naming the first data file of the folder (of those `select` accepts) that `files`
    does not list: a loader would read it unverified."""
    unlisted = [rel for rel in data_files(tag_dir, meta_name) if (select is None or select(rel)) and rel not in files]
    if unlisted:
        more = f"; {len(unlisted) - 1} more files are not covered either" if len(unlisted) > 1 else ""
        raise IntegrityError(
            f"{os.path.join(tag_dir, unlisted[0])}: not covered by the checksums in "
            f"{os.path.join(tag_dir, meta_name)} (the folder changed after the save, or the "
            f"metadata is damaged{more})"
        )


def _canonical_digest(meta):
    body = {k: v for k, v in meta.items() if k != SEAL_NAME}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def seal_metadata(meta):
    """The metadata with its own checksum (SEALED_FORMAT), computed over what a reader will get back
    from the JSON (tuples become lists, integer keys strings), so a round trip never breaks the seal."""
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != SEAL_NAME}))
    body["format"] = SEALED_FORMAT
    return {**body, SEAL_NAME: _canonical_digest(body)}


def check_metadata_seal(meta, path):
    """True when the metadata's own checksum matches, False for the older, unsealed format;
    IntegrityError (one line naming `path`) otherwise."""
    if SEAL_NAME not in meta:
        if meta.get("format") == SEALED_FORMAT:
            raise IntegrityError(f"{path}: corrupted: no {SEAL_NAME!r} entry (a {SEALED_FORMAT} metadata has one)")
        return False
    if meta[SEAL_NAME] != _canonical_digest(meta):
        raise IntegrityError(
            f"{path}: corrupted: its own sha256 does not match its content (the metadata changed after the save)"
        )
    return True


META_COUNTERS = ("iteration", "consumed_samples", "consumed_tokens")


def read_metadata(path):
    """A checkpoint's metadata, checked (text, JSON, its own checksum, field types); meta["sealed"]
    says whether it carries its own checksum. IntegrityError (one line naming `path`) otherwise."""
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise IntegrityError(f"{path}: corrupted (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise IntegrityError(
            f"{path}: corrupted (not valid JSON: {e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    if not isinstance(meta, dict):
        raise IntegrityError(f"{path}: corrupted (a JSON {type(meta).__name__}, expected an object)")
    meta["sealed"] = check_metadata_seal(meta, path)
    if meta["sealed"] and not isinstance(meta.get("files"), dict):
        raise IntegrityError(f"{path}: records no file checksums (every {SEALED_FORMAT} metadata does)")
    for key in META_COUNTERS:
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 0:
            raise IntegrityError(f"{path}: corrupted ({key!r} is {meta.get(key)!r:.40}, expected an integer >= 0)")
    for key in ("model_config", "args", "state", "files"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            raise IntegrityError(f"{path}: corrupted ({key!r} is a {type(meta[key]).__name__}, expected an object)")
    return meta


def check_tag_name(meta, tag, path):
    """The iteration an iter_NNNNNNN folder's metadata records must be NNNNNNN."""
    match = re.fullmatch(r"iter_(\d+)", tag)
    if match and int(match.group(1)) != meta.get("iteration"):
        raise IntegrityError(f"{path}: iteration {meta.get('iteration')} does not match its folder {tag}")


def check_deepspeed_record(tag_dir, meta, path, sealed):
    """The counters the metadata records against the copy DeepSpeed keeps in its module-states file
    (our client state), read without loading any tensor (mmap)."""
    import torch

    names = sorted(n for n in os.listdir(tag_dir) if n.endswith("model_states.pt"))
    if not names:
        return  # nothing for DeepSpeed to load either; it says so in one line
    states = os.path.join(tag_dir, names[0])
    try:
        try:
            state = torch.load(states, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(states, map_location="cpu", weights_only=False)  # an old, non-zip file
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:160]
        raise IntegrityError(f"{states}: cannot be read ({type(e).__name__}: {first})") from None
    record = state.get("megaphi") if isinstance(state, dict) else None
    if not isinstance(record, dict):
        if sealed:
            raise IntegrityError(f"{states}: holds no megaphi record (client state) to check {path} against")
        return  # saved by an older megaphi or another tool
    for key in META_COUNTERS:
        if key in record and record[key] != meta.get(key):
            raise IntegrityError(
                f"{path}: {key} {meta.get(key)} disagrees with DeepSpeed's record in {states} "
                f"({record[key]}); the metadata is damaged or belongs to another save"
            )


def is_disk_full(error, path):
    """Whether a failed write was the disk filling up: errno ENOSPC/EDQUOT, or (torch.save reports
    `basic_ios::clear: iostream error` with no errno) a file system with under 1 MiB free."""
    for e in (error, getattr(error, "__cause__", None), getattr(error, "__context__", None)):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)

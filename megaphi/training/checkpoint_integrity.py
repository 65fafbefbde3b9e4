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
"""
import errno
import os
import zlib

import torch.distributed as dist

HASH_NAME = "crc32"
BLOCK = 16 << 20
TMP_MARKERS = (".tmp.", ".tmp-")  # write_text_atomic / tokenizer temporary names


class IntegrityError(RuntimeError):
    """One line naming the file and what is wrong with it."""


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def _gather(local):
    """Merge per-rank dicts (all ranks get the union)."""
    _, world = _world()
    if world == 1:
        return dict(local)
    parts = [None] * world
    dist.all_gather_object(parts, local)
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def checksum_and_sync(tag_dir, meta_name):
    """Collective. {relative path: {"size", "crc32"}} of the tag folder's data files, each file
    fsynced by the rank that hashed it; then rank 0 fsyncs every folder of the tree."""
    rank, world = _world()
    files = data_files(tag_dir, meta_name)
    local = {}
    for rel in files[rank::world]:
        size, crc = file_crc32(os.path.join(tag_dir, rel), fsync=True)
        local[rel] = {"size": size, HASH_NAME: crc}
    merged = _gather(local)
    if rank == 0:
        for root, _, _ in os.walk(tag_dir):
            fsync_dir(root)
    return {rel: merged[rel] for rel in sorted(merged)}


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    rank, world = _world()
    names = sorted(files)
    local = {}
    for rel in names[rank::world]:
        problem = check_file(tag_dir, rel, files[rel])
        if problem:
            local[rel] = problem
    problems = _gather(local)
    if problems:
        first = sorted(problems)[0]
        more = f" (and {len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        raise IntegrityError(problems[first] + more)


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

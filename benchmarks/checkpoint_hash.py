"""Cost of checkpoint checksums: hashing speed vs write speed (issue 12).

Writes a file of --size-mb random bytes the way a checkpoint file is written (torch.save of a
tensor, then fsync), then times, on the same file: a cold-ish read + CRC-32 (what a save adds: the
checksum pass, megaphi.checkpoint.integrity.file_crc32 with fsync), and in-memory hashing
speed of the candidate hashes (zlib.crc32, zlib.adler32, blake2b, sha256, md5). Prints a table and a
JSON line. The save overhead is hash time / write time: the checksum pass reads back a file that is
still in the page cache, so it costs about one in-memory hash of every byte written, split over the ranks.

    python benchmarks/checkpoint_hash.py                 # 256 MB in ./ (the folder you save into)
    python benchmarks/checkpoint_hash.py --dir /ckpt --size-mb 2048
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from megaphi.checkpoint.integrity import file_crc32  # noqa: E402

HASHES = {
    "crc32 (zlib)": lambda b: zlib.crc32(b),
    "adler32 (zlib)": lambda b: zlib.adler32(b),
    "blake2b": lambda b: hashlib.blake2b(b).digest(),
    "sha256": lambda b: hashlib.sha256(b).digest(),
    "md5": lambda b: hashlib.md5(b).digest(),
}


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=".", help="folder to write the test file in (use the checkpoint disk)")
    p.add_argument("--size-mb", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    nbytes = args.size_mb << 20
    tensor = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    fd, path = tempfile.mkstemp(prefix="ckhash-", suffix=".pt", dir=args.dir)
    os.close(fd)
    try:

        def write():
            torch.save(tensor, path)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())

        write_s = best_of(write, args.repeat)
        size = os.path.getsize(path)
        checksum_pass_s = best_of(lambda: file_crc32(path, fsync=True), args.repeat)
        data = tensor.numpy().tobytes()
        rows = [("torch.save + fsync (write)", write_s, size)]
        rows.append(("checksum pass: read + crc32 + fsync", checksum_pass_s, size))
        for name, fn in HASHES.items():
            rows.append((f"in-memory {name}", best_of(lambda: fn(data), args.repeat), len(data)))
    finally:
        os.unlink(path)
    print(f"{'operation':40s} {'seconds':>9s} {'GB/s':>8s} {'vs write':>9s}")
    result = {"size_bytes": size, "dir": os.path.abspath(args.dir), "cpu_count": os.cpu_count(), "rows": []}
    for name, seconds, n in rows:
        gbs = n / seconds / 1e9
        print(f"{name:40s} {seconds:9.3f} {gbs:8.2f} {seconds / write_s:8.0%}")
        result["rows"].append(
            {
                "operation": name,
                "seconds": round(seconds, 4),
                "gb_per_s": round(gbs, 3),
                "fraction_of_write": round(seconds / write_s, 3),
            }
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

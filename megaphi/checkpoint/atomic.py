"""Atomic writes: a file or folder appears under its name complete, or not at all.

One mechanism (write_atomic): write under a temporary name in the same folder, fsync it, rename it
over the target, fsync the folder. The temporary names (".NAME.tmp-XXXX") are recognised by
integrity.is_temporary, so a killed writer's leftovers are never taken for data. Files get the
modes a plain open() would give under the umask (mkstemp makes 0600; teammates must read
checkpoints too).
"""

import contextlib
import json
import os
import shutil
import tempfile

TMP_INFIX = ".tmp-"


def default_mode(is_dir):
    """What open()/mkdir() would give under the current umask: 0666 & ~umask (0777 for folders)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if is_dir else 0o666) & ~mask


def apply_default_modes(root):
    """chmod a folder tree written through mkstemp/mkdtemp (0600/0700) to the umask's modes."""
    os.chmod(root, default_mode(True))
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), default_mode(True))
        for f in files:
            os.chmod(os.path.join(dirpath, f), default_mode(False))


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomic(path, write):
    """write(tmp_path) fills a temporary file beside `path`; it then replaces `path` (data and rename
    made durable). The temporary file never outlives a failure."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TMP_INFIX}", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode(False))
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def write_text_atomic(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


def write_json_atomic(path, obj, sort_keys=False):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def write_folder_atomic(out_dir, fill):
    """fill(tmp_dir) writes the files; then tmp_dir becomes out_dir (which must be absent or empty)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not empty")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}{TMP_INFIX}", dir=parent)
    try:
        fill(tmp)
        apply_default_modes(tmp)  # mkdtemp makes 0700: give the umask's modes, as a plain mkdir would
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

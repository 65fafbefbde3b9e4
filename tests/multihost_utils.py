"""Helpers of the multi-host tests: tiny megaphi runs launched by torchrun on simulated hosts
(tests/netns_hosts.py) or on this machine, and checkpoint comparison."""

import glob
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 layers, hidden 32, 4 heads (TP=2 splits them), dropout on: the exactness claims cover the dropout masks
TINY = [
    "--model",
    "tiny",
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--ffn-hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--rotary-dim",
    "4",
    "--seq-length",
    "16",
    "--vocab-size",
    "128",
    "--micro-batch-size",
    "1",
    "--global-batch-size",
    "4",
    "--lr",
    "1e-3",
    "--lr-warmup-iters",
    "1",
    "--mock-data",
    "--eval-iters",
    "0",
    "--log-interval",
    "1",
    "--zero-stage",
    "1",
    "--attention-dropout",
    "0.1",
    "--hidden-dropout",
    "0.1",
]


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "GROUP_RANK",
        "LOCAL_WORLD_SIZE",
        "TORCHELASTIC_RUN_ID",
        "GLOO_SOCKET_IFNAME",
    ):
        e.pop(key, None)
    e.update(extra)
    return e


def torchrun(nproc, launcher_flags, train_flags, log_dir):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        *launcher_flags,
        "--log-dir",
        str(log_dir),
        "--redirects",
        "3",
        "-m",
        "megaphi.pretrain",
        *TINY,
        *train_flags,
    ]


def static_flags(nnodes, node_rank, master_addr, port):
    return [
        "--nnodes",
        str(nnodes),
        "--node-rank",
        str(node_rank),
        "--master-addr",
        master_addr,
        "--master-port",
        str(port),
    ]


def wait_all(procs, timeout=600):
    """Wait for every process (a hang guard, not a timing assertion); kill the rest on a timeout."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            raise
    return [p.returncode for p in procs]


def logs(log_dir, name="stderr.log"):
    """{path: text} of every rank's log under a torchrun --log-dir."""
    out = {}
    for path in sorted(glob.glob(os.path.join(str(log_dir), "**", name), recursive=True)):
        with open(path, errors="replace") as f:
            out[path] = f.read()
    return out


def tail(log_dir, n=2500):
    return "\n".join(f"== {p}\n{t[-n:]}" for p, t in logs(log_dir).items()) + "\n".join(
        f"== {p}\n{t[-n:]}" for p, t in logs(log_dir, "stdout.log").items()
    )


def latest(save):
    with open(os.path.join(str(save), "latest")) as f:
        return f.read().strip()


def checkpoint_tensors(save, tag=None):
    """{file/key: tensor} of every tensor file of one checkpoint (model weights, optimizer shards, ...)."""
    tag = tag or latest(save)
    root = os.path.join(str(save), tag)
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        rel = os.path.relpath(path, root)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            for k, v in load_file(path).items():
                out[f"{rel}/{k}"] = v
        elif path.endswith(".pt"):
            obj = torch.load(path, map_location="cpu", weights_only=False)
            _flatten(obj, rel, out)
    return out


def _flatten(obj, prefix, out):
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}/{i}", out)


def assert_same_weights(save_a, save_b, tag=None, model_only=False):
    a, b = checkpoint_tensors(save_a, tag), checkpoint_tensors(save_b, tag)
    if model_only:
        a = {k: v for k, v in a.items() if k.startswith("model/")}
        b = {k: v for k, v in b.items() if k.startswith("model/")}
    assert a, f"no tensors in {save_a}"
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:10]
    unequal = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} of {len(a)} tensors differ: {unequal[:5]}"
    return len(a)

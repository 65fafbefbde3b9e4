"""Draw the loss and learning-rate curves of a training run to a PNG (matplotlib).

    megaphi-plot RUN_DIR                      # reads RUN_DIR/metrics.jsonl -> RUN_DIR/curves.png
    megaphi-plot RUN_DIR/metrics.jsonl --output curves.png --title "phi-1-small, lr 1e-3"
    python tools/plot_metrics.py RUN_DIR      # the same

The title names the run: --title, else the run's folder (its parent when the metrics sit in a folder
named like checkpoints/, logs/: runs/quickstart/checkpoints -> "quickstart").
"""

import argparse
import json
import math
import os
import sys

# folder names that say what a folder holds, not which run it belongs to
GENERIC_FOLDERS = {
    "checkpoints",
    "checkpoint",
    "ckpt",
    "ckpts",
    "logs",
    "log",
    "save",
    "saves",
    "output",
    "outputs",
    "metrics",
    "tensorboard",
    "tb",
}


def read_metrics(path):
    train, valid = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:  # e.g. a line cut short by a kill or a full disk
                print(f"warning: {path}:{lineno}: skipped, not JSON ({e.msg})", file=sys.stderr)
                continue
            if not isinstance(rec, dict):
                print(f"warning: {path}:{lineno}: skipped, not a JSON object", file=sys.stderr)
                continue
            if "loss" in rec and "lr" in rec:
                train.append(rec)
            elif "val_loss" in rec:
                valid.append(rec)
    return train, valid


def run_name(metrics_path):
    """The run a metrics.jsonl belongs to, from its folders."""
    folder = os.path.dirname(os.path.abspath(metrics_path))
    name = os.path.basename(folder)
    parent = os.path.basename(os.path.dirname(folder))
    if name.lower() in GENERIC_FOLDERS and parent:
        return parent
    return name or folder


def _finite(xs, ys):
    pts = [(x, float(y)) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(train, valid, out, title):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib (tools/install.sh installs it)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    x, y = _finite([r["iteration"] for r in train], [r["loss"] for r in train])
    ax_loss.plot(x, y, label="train loss", lw=1.2)
    if valid:
        vx, vy = _finite([r["iteration"] for r in valid], [r["val_loss"] for r in valid])
        ax_loss.plot(vx, vy, "o-", label="validation loss", ms=4)
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_loss.set_title(title)
    ax_lr.plot(*_finite([r["iteration"] for r in train], [r["lr"] for r in train]), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out + ".tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, out)


def build_parser():
    p = argparse.ArgumentParser(
        prog="megaphi-plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from megaphi.cli import add_version_flag

    add_version_flag(p)
    p.add_argument("run", help="run folder holding metrics.jsonl (the --log-dir / --save folder), or the file")
    p.add_argument("--output", help="PNG path (default: RUN/curves.png)")
    p.add_argument("--title", default=None, help="plot title (default: the run's name, from its folders)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    path = os.path.join(args.run, "metrics.jsonl") if os.path.isdir(args.run) else args.run
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found (give the run's --log-dir / --save folder)")
    train, valid = read_metrics(path)
    if not train:
        raise SystemExit(f"error: {path} has no training records (iteration/loss/lr)")
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(path)), "curves.png")
    plot(train, valid, out, args.title or run_name(path))
    first, last = train[0], train[-1]
    print(
        f"wrote {out}: {len(train)} training points, loss {first['loss']:.3f} (iteration {first['iteration']}) "
        f"-> {last['loss']:.3f} (iteration {last['iteration']})"
        + (f", validation loss {valid[-1]['val_loss']:.3f}" if valid else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Draw the loss and learning-rate curves of a training run to a PNG.

    python tools/plot_metrics.py RUN_DIR                 # reads RUN_DIR/metrics.jsonl -> RUN_DIR/curves.png
    python tools/plot_metrics.py RUN_DIR/metrics.jsonl --output curves.png

Uses matplotlib when installed; otherwise draws a plain chart with numpy (no text labels beyond
the axis ranges printed to stdout).
"""
import argparse
import json
import math
import os
import struct
import sys
import zlib


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


def _finite(xs, ys):
    pts = [(x, float(y)) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_matplotlib(train, valid, out, title):
    import matplotlib
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
    ax_lr.plot([r["iteration"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)


def _png_bytes(rgb):
    """Encode an (h, w, 3) uint8 numpy array as PNG (zlib + CRC chunks, no dependencies)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(h))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot_numpy(train, valid, out):
    import numpy as np

    width, panel_h, margin = 800, 300, 40
    img = np.full((2 * panel_h, width, 3), 255, np.uint8)
    xs_all = [r["iteration"] for r in train] + [r["iteration"] for r in valid]
    x0, x1 = min(xs_all), max(max(xs_all), min(xs_all) + 1)

    def draw(panel, series):
        top = panel * panel_h
        ys = [y for _, (_, yv) in series for y in yv]
        if not ys:
            return None
        y0, y1 = min(ys), max(ys)
        if y1 == y0:
            y1 = y0 + 1.0
        left, right, bottom, upper = margin, width - 10, top + panel_h - margin, top + 10
        img[upper:bottom + 1, left] = 0
        img[bottom, left:right + 1] = 0

        def px(x, y):
            return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - upper))

        for color, (xv, yv) in series:
            pts = [px(x, y) for x, y in zip(xv, yv)]
            for (ax, ay), (bx, by) in zip(pts, pts[1:] or pts):
                n = int(max(abs(bx - ax), abs(by - ay))) + 1
                for t in np.linspace(0.0, 1.0, n + 1):
                    cx, cy = int(round(ax + t * (bx - ax))), int(round(ay + t * (by - ay)))
                    img[max(cy - 1, 0):cy + 1, max(cx - 1, 0):cx + 1] = color
        return y0, y1

    tx, ty = _finite([r["iteration"] for r in train], [r["loss"] for r in train])
    loss_series = [((31, 119, 180), (tx, ty))]
    if valid:
        loss_series.append(((214, 39, 40), _finite([r["iteration"] for r in valid], [r["val_loss"] for r in valid])))
    loss_range = draw(0, loss_series)
    lr_range = draw(1, [((44, 160, 44), _finite([r["iteration"] for r in train], [r["lr"] for r in train]))])
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(_png_bytes(img))
    os.replace(tmp, out)
    print(f"(matplotlib not installed: plain chart without labels; pip install matplotlib for a labelled one)\n"
          f"top: loss (blue train, red validation) {loss_range[0]:.3f}..{loss_range[1]:.3f}; "
          f"bottom: lr (green) {lr_range[0]:.3g}..{lr_range[1]:.3g}; x: iteration {x0}..{x1}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder holding metrics.jsonl (the --log-dir / --save folder), or the file")
    p.add_argument("--output", help="PNG path (default: RUN/curves.png)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    path = os.path.join(args.run, "metrics.jsonl") if os.path.isdir(args.run) else args.run
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found (give the run's --log-dir / --save folder)")
    train, valid = read_metrics(path)
    if not train:
        raise SystemExit(f"error: {path} has no training records (iteration/loss/lr)")
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(path)), "curves.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot_numpy(train, valid, out)
    else:
        tmp = out + ".tmp"
        plot_matplotlib(train, valid, tmp, args.title or os.path.basename(os.path.dirname(os.path.abspath(path))))
        os.replace(tmp, out)
    first, last = train[0], train[-1]
    print(f"wrote {out}: {len(train)} training points, loss {first['loss']:.3f} (iteration {first['iteration']}) "
          f"-> {last['loss']:.3f} (iteration {last['iteration']})"
          + (f", validation loss {valid[-1]['val_loss']:.3f}" if valid else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

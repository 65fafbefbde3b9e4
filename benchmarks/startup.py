"""Start-up time of megaphi's commands: how long a user waits before anything happens.

    python benchmarks/startup.py                        # --help, a tiny run to its first iteration, 3 rounds
    python benchmarks/startup.py --fresh-extensions     # also: the first run on a fresh machine
    python benchmarks/startup.py --torchrun --json out.json

Cases (each a fresh process, wall-clock from the launch; medians over --rounds):
- `help`: `python -m megaphi.pretrain --help` (importing torch dominates).
- `tiny to first iteration`: `python -m megaphi.pretrain --model tiny --mock-data ...`, until its first
  `iteration` line is printed; `end to end` until it exits (2 iterations, no save).
- `tiny, fresh extensions` (--fresh-extensions): the same run with TORCH_EXTENSIONS_DIR pointing at an
  empty folder, as on a machine where nothing was ever JIT-built (one round: it is what the first run
  of a fresh installation costs).
- `torchrun 2 ranks` (--torchrun): the tiny run under `torchrun --nproc_per_node 2`.

Also reported per case: whether DeepSpeed printed `... built successfully` (a JIT build or load of one
of its extensions during the run). Prints a table, then the rows as JSON (`--json PATH` writes them).
The machine's load matters: the table says the load average at the start.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TINY = [
    "--model",
    "tiny",
    "--mock-data",
    "--micro-batch-size",
    "2",
    "--train-iters",
    "2",
    "--lr",
    "1e-3",
    "--seq-length",
    "64",
    "--eval-iters",
    "0",
    "--log-interval",
    "1",
]


def timed_run(command, env, timeout):
    """(seconds to the first 'iteration' line or None, seconds to exit, exit code, output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first, lines = [None], []
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if first[0] is None and line.lstrip().startswith("iteration"):
                first[0] = time.perf_counter() - start
        code = proc.wait()
    finally:
        killer.cancel()
    return first[0], time.perf_counter() - start, code, "".join(lines)


def measure(name, command, env, rounds, timeout):
    firsts, totals, built = [], [], False
    for _ in range(rounds):
        first, total, code, output = timed_run(command, env, timeout)
        if code != 0:
            raise SystemExit(f"startup.py: {name}: exit code {code}:\n{output[-2000:]}")
        firsts.append(first)
        totals.append(total)
        built = built or "built successfully" in output
    row = {
        "case": name,
        "rounds": rounds,
        "end_to_end_s": statistics.median(totals),
        "first_iteration_s": None,
        "deepspeed_built_line": built,
        "command": " ".join(command),
    }
    if all(f is not None for f in firsts):
        row["first_iteration_s"] = statistics.median(firsts)
    return row


def table(rows, load):
    out = [
        f"load average at start: {load}",
        "",
        "| case | rounds | to first iteration (s) | end to end (s) | DeepSpeed 'built successfully' |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        first = "-" if r["first_iteration_s"] is None else f"{r['first_iteration_s']:.1f}"
        out.append(
            f"| {r['case']} | {r['rounds']} | {first} | {r['end_to_end_s']:.1f} | "
            f"{'yes' if r['deepspeed_built_line'] else 'no'} |"
        )
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--fresh-extensions",
        action="store_true",
        help="add a run with an empty TORCH_EXTENSIONS_DIR (a fresh machine's first run)",
    )
    p.add_argument("--torchrun", action="store_true", help="add the tiny run under torchrun, 2 ranks")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)

    py = sys.executable
    env = dict(os.environ)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = [
        measure("help", [py, "-m", "megaphi.pretrain", "--help"], env, args.rounds, args.timeout),
        measure("tiny to first iteration", [py, "-m", "megaphi.pretrain", *TINY], env, args.rounds, args.timeout),
    ]
    if args.fresh_extensions:
        with tempfile.TemporaryDirectory(prefix="megaphi-startup-ext-") as ext:
            rows.append(
                measure(
                    "tiny, fresh extensions",
                    [py, "-m", "megaphi.pretrain", *TINY],
                    dict(env, TORCH_EXTENSIONS_DIR=ext),
                    1,
                    args.timeout,
                )
            )
    if args.torchrun:
        command = [
            py,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "megaphi.pretrain",
            *TINY,
            "--global-batch-size",
            "4",
        ]
        rows.append(measure("torchrun 2 ranks", command, env, args.rounds, args.timeout))
    print(table(rows, load))
    print(json.dumps({"load_average": load, "rows": rows}))
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"load_average": load, "rows": rows}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()

"""benchmarks/train.py's reporting: per-configuration results into table rows (medians over rounds,
throughput, memory, host syncs), ratios against the baseline, the markdown table and the
--compare-plain table. The JSON rows are the dicts summarize and add_ratios return."""

import statistics

AXES = ("compile", "recompute", "loss_chunk", "micro_batch")  # the grid's axes, in the table's column order


def same_combination(a, b):
    return all(a[k] == b[k] for k in AXES if k != "micro_batch")


def host_syncs_on_cpu(reads_by_origin):
    """Value reads that would synchronize on a GPU: megaphi's, DeepSpeed's, the benchmark's. torch's own
    (the optimizer reading its step counters) read state that stays on the host on a GPU too."""
    return sum(n for origin, n in reads_by_origin.items() if origin != "torch")


def summarize(cfg, results, clock="wall"):
    """A table row from a configuration's per-round results; ms/step and what follows from it by `clock`."""
    from megaphi.training import metrics

    row = dict(cfg)
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        last = results[-1] if results else {"status": "error", "reason": "not run"}
        row.update(status=last["status"], reason=last.get("reason"))
        return row
    setup = ok[0]["setup"]
    wall = [statistics.median(r["step_seconds"]) for r in ok]
    cpu = [statistics.median(r["step_cpu_seconds"]) for r in ok]
    medians = cpu if clock == "cpu" else wall
    seconds = statistics.median(medians)
    tokens_per_sec, tflops, mfu = metrics.throughput(
        setup["tokens_per_step"], seconds, setup["flops_per_token"], 1, setup["peak_tflops"]
    )
    cuda = ok[0]["cuda_syncs_per_step"] is not None
    syncs = [r["cuda_syncs_per_step"] if cuda else host_syncs_on_cpu(r["value_reads_per_step"]) for r in ok]
    row.update(
        status="ok",
        clock=clock,
        ms_per_step=1000 * seconds,
        ms_per_step_rounds=[1000 * m for m in medians],
        wall_ms_per_step=1000 * statistics.median(wall),
        cpu_ms_per_step=1000 * statistics.median(cpu),
        step_ms={
            "wall": [[round(1000 * t, 2) for t in r["step_seconds"]] for r in ok],
            "cpu": [[round(1000 * t, 2) for t in r["step_cpu_seconds"]] for r in ok],
        },
        tokens_per_sec=tokens_per_sec,
        tflops=tflops,
        mfu=mfu,
        **{
            key + "_gib": statistics.median(r[key + "_bytes"] for r in ok) / 2**30
            for key in ("peak_memory", "step_memory", "forward_backward_memory")
        },
        host_syncs_per_step=statistics.median(syncs),
        value_reads_per_step=ok[-1]["value_reads_per_step"],
        value_read_sites=ok[-1]["value_read_sites"],
        cuda_sync_sites=ok[-1]["cuda_sync_sites"],
        loss_first=ok[-1]["loss_first"],
        loss_last=ok[-1]["loss_last"],
        compile_and_warmup_seconds=statistics.median(r["warmup_seconds"] for r in ok),
    )
    return row


def add_ratios(rows):
    """Time and forward + backward memory ratios against the baseline combination (the first row's)
    at the same micro batch."""
    base_combo = rows[0]
    for row in rows:
        base = next(
            (
                r
                for r in rows
                if same_combination(r, base_combo) and r["micro_batch"] == row["micro_batch"] and r["status"] == "ok"
            ),
            None,
        )
        if row["status"] == "ok" and base is not None:
            row["time_vs_baseline"] = row["ms_per_step"] / base["ms_per_step"]
            base_memory = base["forward_backward_memory_gib"]
            row["forward_backward_memory_vs_baseline"] = (
                row["forward_backward_memory_gib"] / base_memory if base_memory > 0 else None
            )
    return rows


def describe(cfg, micro_batch=True):
    text = f"compile {cfg['compile']}, recompute {cfg['recompute']}, loss chunk {cfg['loss_chunk'] or 'off'}"
    return text + (f", micro batch {cfg['micro_batch']}" if micro_batch else "")


def _num(value, spec):
    return "–" if value is None else format(value, spec)


def _gib(value):
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"  # tiny models: their few KiB still show


def markdown_table(report):
    s = report["setup"] or {}
    cuda = not str(s.get("device", "CPU")).startswith("CPU")
    lines = [
        f"model {report['model']}: {s.get('layers')} layers, hidden {s.get('hidden')}, ffn {s.get('ffn')}, "
        f"heads {s.get('heads')}, vocab {s.get('vocab')}, seq {s.get('seq_length')}, "
        f"{s.get('parameters', 0):,} parameters; {s.get('precision')}, ZeRO {s.get('zero_stage')}, "
        f"accumulation {s.get('accumulation')}; {s.get('device')}; "
        f"{(s.get('flops_per_token') or 0) / 1e9:.3f} GFLOP/token; data: {report['data']}; median of "
        f"{report['steps']} steps after {report['warmup']} warm-up"
        + (f", median of {report['rounds']} rounds" if report["rounds"] > 1 else "")
        + ("; ms/step: the process's CPU time (--clock cpu)" if report.get("clock") == "cpu" else ""),
        "",
        "| compile | recompute | loss chunk | micro batch | ms/step | tokens/s | TFLOP/s | MFU | peak mem GiB | "
        "fwd+bwd mem GiB | host syncs/step | time vs base | fwd+bwd mem vs base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in report["rows"]:
        head = f"| {r['compile']} | {r['recompute']} | {r['loss_chunk'] or 'off'} | {r['micro_batch']} |"
        if r["status"] != "ok":
            lines.append(head + f" {r['status'].upper()} |" + " |" * 8)
            notes.append(f"- {describe(r)}: {r['status']}: {r.get('reason')}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            head + f" {r['ms_per_step']:.1f} | {r['tokens_per_sec']:,.0f} | {r['tflops']:.3g} | {mfu} | "
            f"{_gib(r['peak_memory_gib'])} | {_gib(r['forward_backward_memory_gib'])} | "
            f"{r['host_syncs_per_step']:g} | {_num(r.get('time_vs_baseline'), '.2f')} | "
            f"{_num(r.get('forward_backward_memory_vs_baseline'), '.2f')} |"
        )
    memory = "max_memory_allocated" if cuda else "the process's resident set (VmHWM)"
    syncs = (
        "synchronizing CUDA calls (set_sync_debug_mode)"
        if cuda
        else "tensor value reads by megaphi's and DeepSpeed's code"
    )
    lines += [
        "",
        f"Ratios against {report['baseline']}. Peak mem: {memory} during a step; fwd+bwd mem: its "
        f"forward + backward peak above what is held between steps. Host syncs: {syncs}.",
    ]
    if report.get("best_micro_batch"):
        lines.append(f"Fastest micro batch that fit (--find-max-micro-batch): {report['best_micro_batch']}")
    return "\n".join(lines + notes) + "\n"


def print_compare_plain(result):
    if result["status"] != "ok":
        print(f"compare-plain: {result['status']}: {result.get('reason')}")
        return 1
    med = {name: statistics.median(v) for name, v in result["seconds"].items()}
    cpu = {name: statistics.median(v) for name, v in result["cpu_seconds"].items()}
    print("| loop | ms/step | CPU ms/step |\n|---|---|---|")
    for name in med:
        print(f"| {name} | {1000 * med[name]:.1f} | {1000 * cpu[name]:.1f} |")
    eng, plain = med["megaphi engine"], med["plain PyTorch"]
    print(
        f"\nengine overhead vs plain PyTorch: wall {100 * (eng / plain - 1):+.1f}%, CPU time "
        f"{100 * (cpu['megaphi engine'] / cpu['plain PyTorch'] - 1):+.1f}% (target: within 10%)"
    )
    return 0

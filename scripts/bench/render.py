#!/usr/bin/env python3
"""Render docs/benchmarks.md and docs/plots/*.svg from the raw results.

    render.py [--results target/bench] [--doc docs/benchmarks.md] [--plots docs/plots]

Reads the JSON lines and meta files that run-all.sh writes. A part whose
results are missing is listed as not run. The explanation of each target
comes from scripts/bench/notes.md, included verbatim. Results measured by
other scripts go in scripts/bench/extra.md, appended verbatim at the end of
the page when that file exists.
"""

import argparse
import json
import os
import statistics
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def load(results, name):
    path = os.path.join(results, name + ".jsonl")
    meta_path = os.path.join(results, name + ".meta.json")
    if not os.path.exists(path) or not os.path.exists(meta_path):
        return None, None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(meta_path) as f:
        meta = json.load(f)
    return rows, meta


def med(values):
    return statistics.median(values) if values else float("nan")


def spread(values, fmt="{:.0f}"):
    """Format median and range, e.g. '349 (331-402)'."""
    if not values:
        return "n/a"
    m = med(values)
    if len(values) == 1:
        return fmt.format(m)
    return (fmt + " ({}–{})").format(m, fmt.format(min(values)), fmt.format(max(values)))


def machine_lines(meta, rows):
    m = meta["machine"]
    lines = [
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_mib']} MiB RAM, "
        f"Linux {m['kernel']}; shared with other jobs, so timings include their load.",
        f"- Command: `{meta['command']}` (commit {meta['git']})",
        f"- Date: {meta['date']}",
    ]
    loads = [r["loadavg"] for r in rows if "loadavg" in r]
    if loads:
        lines.append(f"- Load average (1 min) during the runs: {spread(loads, '{:.1f}')}.")
    return lines


def mib(nbytes):
    return nbytes / 1048576


def ratio_word(value, target, higher_is_better=True):
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "missed"


# --- cold start -------------------------------------------------------------

def render_coldstart(rows, meta, plots, targets):
    out = ["## Cold start over an emulated WAN", ""]
    out += machine_lines(meta, rows)
    out += [
        f"- Link: {meta['link']}.",
        f"- esgz-nbd: {meta['lazy']}.",
        f"- Full path: {meta['full']}.",
        "- Times are milliseconds from the first command, median (min–max) over "
        f"{max(r['rep'] for r in rows)} runs; lazy and full runs alternate.",
        "",
        "| link | path | device readable (full path: mounted) | first file read | start-up workload done | bytes fetched | requests |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    by = defaultdict(list)
    for r in rows:
        by[(r["rate"], r["rtt_ms"], r["mode"])].append(r)

    rates = []
    for r in rows:
        key = (r["rate"], r["rtt_ms"])
        if key not in rates:
            rates.append(key)

    plot_data = []
    for rate, rtt in rates:
        lazy = by[(rate, rtt, "lazy")]
        full = by[(rate, rtt, "full")]
        link = f"{rate}, {rtt} ms RTT"
        if lazy:
            out.append(
                f"| {link} | esgz-nbd | {spread([r['device_ms'] for r in lazy])} | "
                f"{spread([r['first_file_ms'] for r in lazy])} | {spread([r['workload_ms'] for r in lazy])} | "
                f"{mib(med([r['bytes'] for r in lazy])):.2f} MiB | {med([r['requests'] for r in lazy]):.0f} |")
        if full:
            out.append(
                f"| {link} | pull + unpack + mke2fs | {spread([r['mount_ms'] for r in full])} | "
                f"{spread([r['first_file_ms'] for r in full])} | {spread([r['workload_ms'] for r in full])} | "
                f"{mib(med([r['bytes'] for r in full])):.2f} MiB | {med([r['requests'] for r in full]):.0f} |")

        if lazy and full:
            first = med([r["first_file_ms"] for r in full]) / med([r["first_file_ms"] for r in lazy])
            work = med([r["workload_ms"] for r in full]) / med([r["workload_ms"] for r in lazy])
            out.append(f"| {link} | **speed-up (full / esgz-nbd), ratio of medians** | | **{first:.1f}x** | "
                       f"**{work:.1f}x** | | |")
            pairs = {r["rep"]: r for r in full}
            first_runs = [pairs[r["rep"]]["first_file_ms"] / r["first_file_ms"] for r in lazy if r["rep"] in pairs]
            work_runs = [pairs[r["rep"]]["workload_ms"] / r["workload_ms"] for r in lazy if r["rep"] in pairs]
            out.append(f"| {link} | speed-up per repetition, median (min–max) | | "
                       f"{spread(first_runs, '{:.1f}')} | {spread(work_runs, '{:.1f}')} | | |")
            plot_data.append((link, lazy, full))
            if rate == "200mbit":
                targets.append(("Cold start to first file read, 200 Mbit/s + 20 ms RTT",
                                ">= 10x faster than pull + unpack + mke2fs",
                                f"{first:.1f}x", ratio_word(first, 10.0)))

    if full:
        out += ["", "Phases of the full path (median ms, cumulative from the start):", "",
                "| link | pulled | unpacked | mke2fs done | mounted |", "| --- | ---: | ---: | ---: | ---: |"]
        for rate, rtt in rates:
            f = by[(rate, rtt, "full")]
            out.append(f"| {rate}, {rtt} ms RTT | {med([r['pull_ms'] for r in f]):.0f} | "
                       f"{med([r['unpack_ms'] for r in f]):.0f} | {med([r['mkfs_ms'] for r in f]):.0f} | "
                       f"{med([r['mount_ms'] for r in f]):.0f} |")

    if plot_data and plots is not None:
        name = plot_coldstart(plots, plot_data)
        out += ["", f"![cold start](plots/{name})"]
    out.append("")
    return out


def plot_coldstart(plots, data):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels, lazy_first, lazy_work, full_first = [], [], [], []
    for link, lazy, full in data:
        labels.append(link)
        lazy_first.append(med([r["first_file_ms"] for r in lazy]) / 1000)
        lazy_work.append(med([r["workload_ms"] for r in lazy]) / 1000)
        full_first.append(med([r["first_file_ms"] for r in full]) / 1000)
    y = range(len(labels))
    h = 0.25
    ax.barh([i - h for i in y], full_first, h, label="pull + unpack + mke2fs: first file")
    ax.barh(list(y), lazy_work, h, label="esgz-nbd: start-up workload done")
    ax.barh([i + h for i in y], lazy_first, h, label="esgz-nbd: first file")
    ax.set_yticks(list(y), labels)
    ax.set_xlabel("seconds from the first command (median)")
    ax.legend(fontsize=8, loc="lower right")
    ax.invert_yaxis()
    fig.tight_layout()
    name = "coldstart.svg"
    fig.savefig(os.path.join(plots, name))
    plt.close(fig)
    return name


# --- warm reads -------------------------------------------------------------

def render_warm(rows, meta, plots, targets):
    out = ["## Warm reads of the whole export", ""]
    out += machine_lines(meta, rows)
    servers = meta["servers"]
    out += [f"- {name}: `{cmd}`" for name, cmd in servers.items()]
    out += [
        f"- Sequential: `{meta['seq']}`.",
        f"- Random: `{meta['rand']}`; {meta.get('passes', '1 pass')}.",
        f"- Export: {mib(meta['export_bytes']):.1f} MiB (the Debian image). MB/s = 10^6 bytes per second, "
        f"median (min–max) over {max(r['rep'] for r in rows)} runs.",
    ]
    with_cpu = all("server_cpu_s" in r for r in rows)
    if with_cpu:
        out.append(f"- Server CPU: {meta['server_cpu']}; the last column divides esgz-nbd's median "
                   "CPU time per byte by nbdkit's (below 1 means esgz-nbd used less CPU per byte).")
    header = "| pattern | request | queue depth | esgz-nbd MB/s | nbdkit file MB/s | qemu-nbd MB/s | esgz-nbd / nbdkit |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if with_cpu:
        header += " server CPU per byte, esgz-nbd / nbdkit |"
        rule += " ---: |"
    out += ["", header, rule]

    by = defaultdict(list)
    cpu = defaultdict(list)
    keys = []
    for r in rows:
        key = (r["pattern"], r["request_bytes"], r["depth"])
        if key not in keys:
            keys.append(key)
        by[key + (r["server"],)].append(r["mb_per_s"])
        if with_cpu:
            cpu[key + (r["server"],)].append(r["server_cpu_s"] / r["bytes"])

    seq_ratios = []
    plot_rows = []
    for pattern, size, depth in keys:
        ours = by[(pattern, size, depth, "esgz-nbd")]
        kit = by[(pattern, size, depth, "nbdkit")]
        qemu = by[(pattern, size, depth, "qemu-nbd")]
        ratio = med(ours) / med(kit)
        if pattern == "seq":
            seq_ratios.append((size, ratio))
        size_text = f"{size // 1024} KiB" if size < 1048576 else f"{size // 1048576} MiB"
        depth_text = "64 (nbdcopy)" if pattern == "seq" else str(depth)
        line = (f"| {'sequential' if pattern == 'seq' else 'random'} | {size_text} | {depth_text} | "
                f"{spread(ours)} | {spread(kit)} | {spread(qemu)} | {ratio:.2f} |")
        if with_cpu:
            kit_cpu = med(cpu[(pattern, size, depth, "nbdkit")])
            cpu_ratio = med(cpu[(pattern, size, depth, "esgz-nbd")]) / kit_cpu if kit_cpu else float("nan")
            line += f" {cpu_ratio:.2f} |"
        out.append(line)
        plot_rows.append((f"{pattern} {size_text} qd{depth}", med(ours), med(kit), med(qemu)))

    for size, ratio in seq_ratios:
        size_text = f"{size // 1024} KiB" if size < 1048576 else f"{size // 1048576} MiB"
        targets.append((f"Warm sequential reads, {size_text} requests", ">= 0.9x nbdkit file plugin",
                        f"{ratio:.2f}x", ratio_word(ratio, 0.9)))
    if plots is not None and plot_rows:
        out += ["", f"![warm reads](plots/{plot_warm(plots, plot_rows)})"]
    out.append("")
    return out


def plot_warm(plots, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = range(len(rows))
    w = 0.27
    ax.bar([i - w for i in x], [r[1] for r in rows], w, label="esgz-nbd")
    ax.bar(list(x), [r[2] for r in rows], w, label="nbdkit file")
    ax.bar([i + w for i in x], [r[3] for r in rows], w, label="qemu-nbd")
    ax.set_xticks(list(x), [r[0] for r in rows], rotation=20, fontsize=8)
    ax.set_ylabel("MB/s (median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = "warm.svg"
    fig.savefig(os.path.join(plots, name))
    plt.close(fig)
    return name


# --- cold sequential --------------------------------------------------------

def cpu_cell(runs):
    """Median server CPU seconds and the cores they kept busy, or '-' for old results."""
    pairs = [(r["cpu_seconds"], r["seconds"]) for r in runs if "cpu_seconds" in r]
    if not pairs:
        return "-"
    cpu = med([c for c, _ in pairs])
    return f"{cpu:.2f} ({med([c / w for c, w in pairs]):.2f})"


def render_coldseq(rows, meta, targets):
    out = ["## Cold sequential read against the link and gunzip limits", ""]
    out += machine_lines(meta, rows)
    out += [
        f"- Link: {meta['link']}.",
        f"- esgz-nbd: `{meta['esgz-nbd']}` (fresh cache each run; the time is the nbdcopy only).",
        f"- Link limit: `{meta['link_limit']}`.",
        f"- Gunzip limit: {meta['gunzip_limit']} (the faster method, fastest run).",
        "- Times in seconds, median (min–max). Throughput is blob bytes per second, so the"
        " ratio is limit time / esgz-nbd time.",
        "",
    ]

    gunzip = [r["seconds"] for r in rows if r["kind"].startswith("gunzip")]
    gz_best = min(gunzip) if gunzip else float("nan")
    blob = rows[0]["blob_bytes"]
    out += ["| link | esgz-nbd nbdcopy | server CPU s (cores busy) | bytes / requests fetched | curl of the blob | "
            "gunzip, 2 cores | limit (slower of the two) | esgz-nbd / limit |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    rates = []
    for r in rows:
        if r["kind"] != "esgz-nbd" or r["rate"] in rates:
            continue
        rates.append(r["rate"])
    for rate in rates:
        ours = [r["seconds"] for r in rows if r["kind"] == "esgz-nbd" and r["rate"] == rate]
        fetched = [r for r in rows if r["kind"] == "esgz-nbd" and r["rate"] == rate]
        link = [r["seconds"] for r in rows if r["kind"] == "link" and r["rate"] == rate]
        limit = max(med(link), gz_best)
        ratio = limit / med(ours)
        out.append(
            f"| {rate}, 20 ms RTT | {spread(ours, '{:.2f}')} ({blob / med(ours) / 1e6:.0f} MB/s) | "
            f"{cpu_cell(fetched)} | "
            f"{mib(med([r['bytes'] for r in fetched])):.1f} MiB / {med([r['requests'] for r in fetched]):.0f} | "
            f"{spread(link, '{:.2f}')} ({blob / med(link) / 1e6:.0f} MB/s) | {gz_best:.2f} "
            f"({blob / gz_best / 1e6:.0f} MB/s) | {limit:.2f} | **{ratio:.2f}** |")
        targets.append((f"Cold sequential read, {rate} + 20 ms RTT",
                        ">= 0.8x min(link, gunzip)", f"{ratio:.2f}x", ratio_word(ratio, 0.8)))

    local = [r for r in rows if r["kind"] == "esgz-nbd-local"]
    if local:
        secs = [r["seconds"] for r in local]
        ratio = gz_best / med(secs)
        out.append(
            f"| none (OCI layout on local disk) | {spread(secs, '{:.2f}')} ({blob / med(secs) / 1e6:.0f} MB/s) | "
            f"{cpu_cell(local)} | - | - | {gz_best:.2f} ({blob / gz_best / 1e6:.0f} MB/s) | {gz_best:.2f} | "
            f"**{ratio:.2f}** |")
        if meta.get("local"):
            out += ["", f"Local run: `{meta['local']}`. Server CPU: {meta.get('cpu', '')}; cores busy = CPU seconds"
                    " / nbdcopy seconds."]

    g_rows = defaultdict(list)
    for r in rows:
        if r["kind"].startswith("gunzip"):
            g_rows[r["kind"]].append(r["seconds"])
    out += ["", "Gunzip runs (seconds): " + "; ".join(
        f"{k}: {spread(v, '{:.2f}')}" for k, v in g_rows.items()) + f". Blob: {mib(blob):.1f} MiB.", ""]
    return out


# --- attach -----------------------------------------------------------------

def render_attach(rows, meta, plots, targets):
    out = ["## Attach cost with many entries and layers", ""]
    out += machine_lines(meta, rows)
    out += [
        f"- Images: `{meta['generator']}`; entries are split evenly over the layers, which share"
        " their directory names, so the layers merge.",
        f"- Measured: {meta['serve']}.",
        f"- Reference check of the generated 1k-entry, 5-layer image with `estargz-ref verify -oci DIR:latest"
        f" -require-all`: {meta['reference_check'] or 'not run'}.",
        f"- Median (min–max) over {max(r['rep'] for r in rows)} runs.",
        "",
        "| entries | layers | blob MiB | serve to first read, ms | VmHWM MiB |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]

    by = defaultdict(list)
    keys = []
    for r in rows:
        key = (r["entries"], r["layers"])
        if key not in keys:
            keys.append(key)
        by[key].append(r)
    for entries, layers in sorted(keys):
        rs = by[(entries, layers)]
        out.append(f"| {entries:,} | {layers} | {mib(rs[0]['blob_bytes']):.1f} | "
                   f"{spread([r['ready_ms'] for r in rs])} | "
                   f"{spread([r['vm_hwm_kib'] / 1024 for r in rs])} |")

    million = [r for r in rows if r["entries"] >= 1000000]
    if million:
        worst = max(med([r["vm_hwm_kib"] for r in by[k]]) for k in keys if k[0] >= 1000000) * 1024 / 1e6
        targets.append(("1M-entry attach, peak resident memory", "< 300 MB",
                        f"{worst:.0f} MB (worst layer count)", "met" if worst < 300 else "missed"))
    if plots is not None:
        out += ["", f"![attach](plots/{plot_attach(plots, by, keys)})"]
    out.append("")
    return out


def plot_attach(plots, by, keys):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    for layers in sorted({k[1] for k in keys}):
        xs = sorted(k[0] for k in keys if k[1] == layers)
        a1.plot(xs, [med([r["ready_ms"] for r in by[(x, layers)]]) for x in xs], marker="o",
                label=f"{layers} layers")
        a2.plot(xs, [med([r["vm_hwm_kib"] for r in by[(x, layers)]]) / 1024 for x in xs], marker="o",
                label=f"{layers} layers")
    for ax, label in ((a1, "serve to first read (ms)"), (a2, "VmHWM (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("TOC entries")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    a2.axhline(300e6 / 1048576, color="grey", linestyle="--", linewidth=0.8)
    fig.tight_layout()
    name = "attach.svg"
    fig.savefig(os.path.join(plots, name))
    plt.close(fig)
    return name


# --- record, then prioritize --------------------------------------------------

def render_record(rows, meta, targets):
    out = ["## Record a workload, then prioritize its files", ""]
    out += machine_lines(meta, rows)
    out += [
        f"- Workload: `{meta['workload']}` in the mounted tree; the record run wrote "
        f"{meta['recorded_files']} paths.",
        f"- Link: {meta['link']}.",
        f"- Images: {meta['images']}.",
        f"- Each run: {meta['run']}.",
        "- Each run starts with a fresh cache. Range requests and bytes are the store's"
        " (file data, prefetch included); opening the image (manifest, footer, TOC) is"
        " counted apart. Times in ms, median (min–max).",
        "",
        "| image | range requests | MiB fetched | reads that waited for a fetch | "
        "serve start to workload end | workload alone | opening: requests / MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    medians = {}
    for kind in ["plain", "prioritized"]:
        runs = [r for r in rows if r["kind"] == kind]
        if not runs:
            continue
        requests = [r["store_requests"] for r in runs]
        medians[kind] = med(requests)
        out.append(
            f"| {kind} | {spread(requests)} | {mib(med([r['store_bytes'] for r in runs])):.2f} | "
            f"{spread([r['cache_misses'] for r in runs])} | {spread([r['run_ms'] for r in runs])} | "
            f"{spread([r['workload_ms'] for r in runs])} | "
            f"{med([r['startup_requests'] for r in runs]):.0f} / "
            f"{mib(med([r['startup_bytes'] for r in runs])):.2f} |")
    if "plain" in medians and "prioritized" in medians:
        targets.append(("Record, then prioritize: range requests of a cold run",
                        "fewer than unprioritized",
                        f"{medians['prioritized']:.0f} vs {medians['plain']:.0f}",
                        ratio_word(medians["prioritized"], medians["plain"] - 1,
                                   higher_is_better=False)))
    out.append("")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(REPO, "target", "bench"))
    parser.add_argument("--doc", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--plots", default=os.path.join(REPO, "docs", "plots"))
    args = parser.parse_args()
    os.makedirs(args.plots, exist_ok=True)

    targets = []
    sections = []
    parts = [
        ("coldstart", lambda r, m: render_coldstart(r, m, args.plots, targets)),
        ("warm", lambda r, m: render_warm(r, m, args.plots, targets)),
        ("coldseq", lambda r, m: render_coldseq(r, m, targets)),
        ("attach", lambda r, m: render_attach(r, m, args.plots, targets)),
        ("record", lambda r, m: render_record(r, m, targets)),
    ]
    for name, render in parts:
        rows, meta = load(args.results, name)
        if not rows:
            sections += [f"## {name}", "", f"Not run: no {name}.jsonl in the results.", ""]
            continue
        sections += render(rows, meta)

    doc = [
        "# Benchmarks",
        "",
        "Measured with the harness in `scripts/bench/` driving the release binary. "
        "`sudo scripts/bench/run-all.sh` reruns everything (about 7 minutes on this shared 2-core machine, plus about 10 minutes the first time to generate the synthetic images), writes the raw "
        "results to `target/bench/` and regenerates this page and `docs/plots/` with "
        "`scripts/bench/render.py`. Each section names its machine, command and date.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | result |",
        "| --- | --- | ---: | --- |",
    ]
    doc += [f"| {t} | {goal} | {value} | {word} |" for t, goal, value, word in targets]
    doc.append("")
    notes = os.path.join(HERE, "notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            doc += [f.read().rstrip(), ""]
    doc += sections
    extra = os.path.join(HERE, "extra.md")
    if os.path.exists(extra):
        with open(extra) as f:
            doc += [f.read().rstrip(), ""]
    with open(args.doc, "w") as f:
        f.write("\n".join(doc).rstrip() + "\n")
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()

"""Turn rows into what people read: markdown tables, the committed CSV, and PNG plots.

The CSV is appended to, one row per (case, provider), each carrying the run's id, date, card and
versions, so plots and tables can be remade from it later for any past run.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import os
import platform
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import torch

from bench.runner import Row

META_FIELDS = ("run_id", "date", "device", "torch", "triton", "cuda", "python")
ROW_FIELDS = tuple(f.name for f in dataclasses.fields(Row))
CSV_FIELDS = META_FIELDS + ROW_FIELDS
_INT_FIELDS = {"batch", "heads", "seq", "head_dim", "peak_bytes", "saved_bytes"}
_FLOAT_FIELDS = {"ms_p20", "ms_p50", "ms_p80", "tflops", "speed_vs_fused"}


def run_metadata(device: torch.device | str) -> dict[str, str]:
    """Who measured what: a run id (UTC start time), the card and the software versions."""
    import triton

    device = torch.device(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        name = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Triton interpreter"
    return {"run_id": now.strftime("%Y%m%dT%H%M%SZ"), "date": now.strftime("%Y-%m-%d"), "device": name,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda or "none",
            "python": platform.python_version()}


def append_csv(path: Path, meta: dict[str, str], rows: Iterable[Row]) -> None:
    """Append the main benchmark's rows to `path` (see `append_records`)."""
    append_records(path, CSV_FIELDS, ({**meta, **dataclasses.asdict(row)} for row in rows))


def append_records(path: Path, fields: Sequence[str], records: Iterable[dict[str, object]]) -> None:
    """Append records to the CSV `path` with columns `fields` (others are left out), writing the
    header if the file is new; a file with another header is an error rather than a silently
    mixed table. The benchmarks' CSVs (main, variants, decoding) all go through here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = path.exists() and path.stat().st_size > 0
    if exists:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != tuple(fields):
            raise ValueError(f"{path} has columns {header}, expected {list(fields)}; "
                             "write to a new file (--csv) instead")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        if not exists:
            writer.writeheader()
        for record in records:
            writer.writerow({k: _format_cell(v) for k, v in record.items()})


def _format_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_csv(path: Path) -> list[dict[str, object]]:
    """Rows of a results CSV with numbers parsed (empty cells become None)."""
    records = []
    with path.open(newline="") as f:
        for raw in csv.DictReader(f):
            record: dict[str, object] = dict(raw)
            for key in _INT_FIELDS:
                record[key] = int(raw[key]) if raw.get(key) else None
            for key in _FLOAT_FIELDS:
                record[key] = float(raw[key]) if raw.get(key) else None
            record["causal"] = raw["causal"] == "True"
            record["timed"] = raw["timed"] == "True"
            records.append(record)
    return records


def latest_run(records: Sequence[dict[str, object]], gpu: bool | None = None) -> list[dict[str, object]]:
    """The records of the newest run (optionally only GPU or only CPU runs)."""
    if gpu is not None:
        records = [r for r in records if (not str(r["device"]).startswith("cpu")) == gpu]
    if not records:
        return []
    newest = max(str(r["run_id"]) for r in records)
    return [r for r in records if r["run_id"] == newest]


# ----------------------------------------------------------------------------------------------
# Markdown


class _Footnotes:
    def __init__(self) -> None:
        self.notes: dict[tuple[str, str], int] = {}

    def mark(self, provider: str, reason: str) -> str:
        key = (provider, reason)
        if key not in self.notes:
            self.notes[key] = len(self.notes) + 1
        return f"[{self.notes[key]}]"

    def render(self) -> str:
        return "\n".join(f"[{n}] {provider}: {reason}" for (provider, reason), n in self.notes.items())


def _cell(record: dict[str, object], value: str, notes: _Footnotes) -> str:
    status = record["status"]
    if status == "ok":
        return value
    if status == "OOM":
        return "OOM"
    return f"{status}{notes.mark(str(record['provider']), str(record['reason']))}"


def _providers_in(records: Sequence[dict[str, object]]) -> list[str]:
    return list(dict.fromkeys(str(r["provider"]) for r in records))


def throughput_table(records: Sequence[dict[str, object]]) -> str:
    """One line per case, one column per provider: TFLOP/s and, in brackets, the speed relative
    to fused_attn in the same run (0.50x = half as fast as fused_attn)."""
    cases: dict[tuple, dict[str, dict[str, object]]] = defaultdict(dict)
    for r in records:
        if not r["timed"]:
            continue
        cases[(r["mode"], r["causal"], r["dtype"], r["head_dim"], r["seq"], r["batch"], r["heads"])][str(r["provider"])] = r
    if not cases:
        return "No timed cases in this run."
    providers = _providers_in(records)
    notes = _Footnotes()
    lines = ["| mode | causal | dtype | D | S | B x H | " + " | ".join(providers) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(providers)]
    for (mode, causal, dtype, head_dim, seq, batch, heads), by_provider in cases.items():
        cells = []
        for name in providers:
            r = by_provider.get(name)
            if r is None:
                cells.append("")
                continue
            ratio = f" ({r['speed_vs_fused']:.2f}x)" if r["speed_vs_fused"] is not None and name != "fused_attn" else ""
            cells.append(_cell(r, f"{_tflops(r['tflops'])}{ratio}" if r["tflops"] is not None else "", notes))
        lines.append(f"| {mode} | {causal} | {dtype} | {head_dim} | {seq} | {batch} x {heads} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\n" + notes.render() if notes.notes else "")


def _tflops(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def memory_table(records: Sequence[dict[str, object]], field: str = "peak_bytes") -> str:
    """Forward+backward rows: MiB per provider per case, and the naive/fused ratio where both ran."""
    rows = [r for r in records if r["mode"] == "fwd+bwd"]
    cases: dict[tuple, dict[str, dict[str, object]]] = defaultdict(dict)
    for r in rows:
        cases[(r["causal"], r["dtype"], r["head_dim"], r["batch"], r["heads"], r["seq"])][str(r["provider"])] = r
    if not cases:
        return "No forward+backward cases in this run."
    providers = _providers_in(rows)
    notes = _Footnotes()
    lines = ["| causal | dtype | D | B x H | S | " + " | ".join(f"{p} MiB" for p in providers) + " |",
             "|---|---|---|---|---|" + "---|" * len(providers)]
    for (causal, dtype, head_dim, batch, heads, seq), by_provider in sorted(
            cases.items(), key=lambda kv: tuple(str(x) for x in kv[0][:5]) + (kv[0][5],)):
        cells = []
        for name in providers:
            r = by_provider.get(name)
            value = r.get(field) if r else None
            cells.append("" if r is None else _cell(r, f"{value / 2**20:,.2f}" if value is not None else "", notes))
        lines.append(f"| {causal} | {dtype} | {head_dim} | {batch} x {heads} | {seq} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\n" + notes.render() if notes.notes else "")


def summary_table(records: Sequence[dict[str, object]]) -> str:
    """Per (mode, causal, dtype, D): fused_attn's median TFLOP/s over sequence lengths and each
    other provider's geometric-mean speed relative to fused_attn (cases where both ran)."""
    groups: dict[tuple, list[dict[str, object]]] = defaultdict(list)
    for r in records:
        if r["tflops"] is not None:
            groups[(r["mode"], r["causal"], r["dtype"], r["head_dim"])].append(r)
    if not groups:
        return "No timed cases in this run."
    others = [p for p in _providers_in(records) if p != "fused_attn"]
    lines = ["| mode | causal | dtype | D | fused_attn TFLOP/s (median) | " + " | ".join(f"{p} vs fused" for p in others) + " |",
             "|---|---|---|---|---|" + "---|" * len(others)]
    for (mode, causal, dtype, head_dim), group in groups.items():
        fused = sorted(r["tflops"] for r in group if r["provider"] == "fused_attn")
        cells = []
        for name in others:
            ratios = [r["speed_vs_fused"] for r in group if r["provider"] == name and r["speed_vs_fused"]]
            cells.append(f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x" if ratios else "-")
        median = _tflops(fused[len(fused) // 2]) if fused else "-"
        lines.append(f"| {mode} | {causal} | {dtype} | {head_dim} | {median} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots


def plot_throughput(records: Sequence[dict[str, object]], path: Path, dtype: str = "bfloat16") -> Path | None:
    """TFLOP/s against sequence length: one panel per (mode, causal, D), one line per provider."""
    timed = [r for r in records if r["tflops"] is not None and r["dtype"] == dtype]
    if not timed:
        return None
    plt = _pyplot()
    panels = sorted({(r["mode"], r["causal"], r["head_dim"]) for r in timed},
                    key=lambda p: (["fwd", "bwd", "fwd+bwd"].index(str(p[0])), p[1], p[2]))
    columns = min(4, len(panels))
    rows_n = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(4.2 * columns, 3.2 * rows_n), squeeze=False)
    for ax, (mode, causal, head_dim) in zip(axes.flat, panels):
        for name in _providers_in(timed):
            points = sorted((r["seq"], r["tflops"]) for r in timed
                            if (r["mode"], r["causal"], r["head_dim"], r["provider"]) == (mode, causal, head_dim, name))
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name,
                        linewidth=2.5 if name == "fused_attn" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}, {'causal' if causal else 'full'}, D={head_dim}", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{dtype}, B*S = 16k tokens, H*D = 2048 - {records[0]['device']}, {records[0]['date']}", fontsize=10)
    return _save(fig, path)


def plot_memory(records: Sequence[dict[str, object]], path: Path) -> Path | None:
    """Peak bytes and bytes saved for backward against sequence length (forward+backward, log-log),
    one line per provider, for the (causal, dtype, D) group of the memory-only lengths (the
    longest), or else the run's first group."""
    rows = [r for r in records if r["mode"] == "fwd+bwd" and r["status"] == "ok"]
    if not rows:
        return None
    chosen = next((r for r in rows if not r["timed"]), rows[0])
    causal, dtype, head_dim = chosen["causal"], chosen["dtype"], chosen["head_dim"]
    rows = [r for r in rows if (r["causal"], r["dtype"], r["head_dim"]) == (causal, dtype, head_dim)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, field, title in ((axes[0], "peak_bytes", "peak allocation above inputs"),
                             (axes[1], "saved_bytes", "saved for backward")):
        for name in _providers_in(rows):
            points = sorted((r["seq"], r[field] / r["batch"] / r["heads"]) for r in rows
                            if r["provider"] == name and r[field])
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name,
                        linewidth=2.5 if name == "fused_attn" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"{title}, per (batch, head)", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("bytes")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"forward+backward, {'causal' if causal else 'full'}, {dtype}, D={head_dim} - "
                 f"{records[0]['device']}, {records[0]['date']}", fontsize=9)
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def make_plots(records: Sequence[dict[str, object]], out_dir: Path, prefix: str) -> list[Path]:
    """Every plot of one run: throughput per dtype (GPU runs) and memory."""
    paths = []
    for dtype in dict.fromkeys(str(r["dtype"]) for r in records if r["tflops"] is not None):
        paths.append(plot_throughput(records, out_dir / f"{prefix}_throughput_{dtype}.png", dtype))
    paths.append(plot_memory(records, out_dir / f"{prefix}_memory.png"))
    return [p for p in paths if p is not None]


def main(argv: list[str] | None = None) -> int:
    """python -m bench.report CSV [--out DIR]: tables and plots of the newest run in a results CSV."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--out", type=Path, help="folder for the plots (default: beside the CSV)")
    args = parser.parse_args(argv)
    records = latest_run(read_csv(args.csv))
    if not records:
        raise SystemExit(f"{args.csv} has no rows")
    gpu = not str(records[0]["device"]).startswith("cpu")
    print(f"# {records[0]['device']}, {records[0]['date']} (run {records[0]['run_id']})\n")
    if gpu:
        print(throughput_table(records) + "\n")
    print(memory_table(records, "peak_bytes") + "\n")
    for path in make_plots(records, args.out or args.csv.parent, "gpu" if gpu else "cpu"):
        print(f"Plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

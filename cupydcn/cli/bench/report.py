"""The Markdown report of a set of records: per op a time table (cupydcn, TFLOP/s, % of
the GEMM peak, each peer and its ratio) and a peak-extra-memory table; the providers
not run, by reason; the shapes' legend."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .providers import PROVIDER_ORDER, provider_label
from .shapes import DTYPES, OPS, PASSES, VARIANTS, Shape


def _fmt_ms(value) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _fmt_mib(value) -> str:
    if value is None:
        return "n/t"
    return f"{value / 2**20:.1f}"


def order_of(value, sequence) -> int:
    """``value``'s position in ``sequence`` (values not in it sort last)."""
    return sequence.index(value) if value in sequence else len(sequence)


def shape_sort_key(shape_id: str):
    """Sort key of a shape id: S2 before S10, S2 before S2-og4."""
    match = re.match(r"([A-Z]+)(\d+)(.*)", shape_id)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else (shape_id, 0, "")


def table_rows(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Group the records by op into rows keyed (shape, variant, dtype, pass), each with the
    cupydcn record and the peers' records ("-" variant records serve both variants)."""
    by_op: dict[str, dict[tuple, dict]] = {}
    for r in records:
        by_op.setdefault(r["op"], {})[
            (r["shape"], r["variant"], r["dtype"], r["pass"], r["provider"])
        ] = r
    out: dict[str, list[dict]] = {}
    for op in sorted(by_op, key=lambda o: order_of(o, OPS)):
        found = by_op[op]
        keys = {(s, v, d, p) for (s, v, d, p, _) in found}
        with_variant = {(s, d, p) for (s, v, d, p) in keys if v != "-"}
        keys = {k for k in keys if k[1] != "-" or (k[0], k[2], k[3]) not in with_variant}
        rows = []
        for key in sorted(
            keys,
            key=lambda k: (
                shape_sort_key(k[0]),
                order_of(k[1], VARIANTS),
                order_of(k[2], DTYPES),
                order_of(k[3], PASSES),
            ),
        ):
            shape_id, variant, dtype, pass_ = key
            providers = {}
            for (s, v, d, p, provider), r in found.items():
                if (s, d, p) == (shape_id, dtype, pass_) and (v == variant or v == "-"):
                    providers.setdefault(provider, r)
            rows.append(
                {
                    "shape": shape_id,
                    "variant": variant,
                    "dtype": dtype,
                    "pass": pass_,
                    "providers": providers,
                }
            )
        out[op] = rows
    return out


def markdown_tables(records: Sequence[dict], peaks: dict[str, dict] | None = None) -> str:
    """Per op: a time table (cupydcn ms, TFLOP/s, % of the measured GEMM peak, then each
    peer's ms and peer/cupydcn ratio) and a peak-extra-memory table."""
    peaks = peaks or {}
    parts: list[str] = []
    notes: dict[str, str] = {}
    for op, rows in table_rows(records).items():
        peers = sorted(
            {p for row in rows for p in row["providers"] if p != "cupydcn"},
            key=lambda p: order_of(p, PROVIDER_ORDER),
        )
        kinds = {r["device_kind"] for row in rows for r in row["providers"].values()}
        kind = "cuda" if "cuda" in kinds else "cpu"
        conv = op == "deform_conv2d"
        head = ["shape", "mask", "dtype", "pass", "cupydcn ms"]
        if conv:
            head += ["TFLOP/s", "% peak"]
        for peer in peers:
            head += [f"{provider_label(peer, kind)} ms", "×"]
        lines = [
            f"### {op}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" if i < 4 else "---:" for i in range(len(head))) + "|",
        ]
        mem_head = ["shape", "mask", "dtype", "pass"] + [
            provider_label(p, kind) for p in ("cupydcn", *peers)
        ]
        mem_lines = [
            "| " + " | ".join(mem_head) + " |",
            "|" + "|".join("---" if i < 4 else "---:" for i in range(len(mem_head))) + "|",
        ]
        for row in rows:
            mine = row["providers"].get("cupydcn")
            base = mine["median_ms"] if mine else None
            cells = [row["shape"], row["variant"], row["dtype"], row["pass"], _fmt_ms(base)]
            if conv:
                tflops = pct = "—"
                if mine and mine.get("flops") and base and math.isfinite(base):
                    achieved = mine["flops"] / (base * 1e-3) / 1e12
                    tflops = f"{achieved:.3g}"
                    peak = peaks.get(mine.get("peak_gemm_dtype", row["dtype"]))
                    if peak and peak.get("tflops"):
                        pct = f"{100 * achieved / peak['tflops']:.3g}"
                cells += [tflops, pct]
            mem_cells = [
                row["shape"],
                row["variant"],
                row["dtype"],
                row["pass"],
                _fmt_mib(mine["peak_extra_bytes"]) if mine else "—",
            ]
            for peer in peers:
                r = row["providers"].get(peer)
                if r is None:
                    cells += ["—", "—"]
                    mem_cells.append("—")
                    continue
                mark = ""
                if r.get("note"):
                    mark = "†" if "upcast" in r["note"] else ""
                    if mark:
                        notes["†"] = r["note"]
                ratio = (
                    f"{r['median_ms'] / base:.3g}"
                    if base and math.isfinite(base) and math.isfinite(r["median_ms"])
                    else "—"
                )
                cells += [_fmt_ms(r["median_ms"]) + mark, ratio]
                mem_cells.append(_fmt_mib(r["peak_extra_bytes"]))
            lines.append("| " + " | ".join(cells) + " |")
            mem_lines.append("| " + " | ".join(mem_cells) + " |")
        lines += ["", f"Peak extra memory (MiB, n/t = not tracked), {op}:", "", *mem_lines, ""]
        parts.append("\n".join(lines))
    text = "\n".join(parts)
    legend = [
        "× = peer time / cupydcn time (above 1: cupydcn is faster). "
        "TFLOP/s counts 2·N·C_out·H_out·W_out·(C_in/groups)·kh·kw per forward "
        "(backward ×2, forward+backward ×3); % peak is against the GEMM peak measured "
        "in the same run."
    ]
    for mark, note in notes.items():
        legend.append(f"{mark} bfloat16 row: {note}.")
    return text + "\n" + "\n".join(legend) + "\n"


def skipped_lines(skipped: dict[tuple[str, str], int]) -> list[str]:
    """Markdown bullets of the providers not run, grouped by reason (GPU labels: the
    providers as they are named on a GPU)."""
    by_reason: dict[str, dict[str, int]] = {}
    for (provider, reason), count in skipped.items():
        by_reason.setdefault(reason, {})
        by_reason[reason][provider] = by_reason[reason].get(provider, 0) + count
    lines = []
    for reason, providers in by_reason.items():
        names = ", ".join(
            f"{provider_label(p)} ({n})"
            for p, n in sorted(providers.items(), key=lambda kv: order_of(kv[0], PROVIDER_ORDER))
        )
        lines.append(f"- {names}: {reason}")
    return lines


def shapes_legend(shapes: Sequence[Shape]) -> str:
    lines = ["| shape | op | dims | why |", "|---|---|---|---|"]
    for s in shapes:
        lines.append(f"| {s.id} | {s.op} | {s.describe()} | {s.why} |")
    return "\n".join(lines) + "\n"

"""The benchmark's report: every measurement with its ratios to the same run's baselines, as a
table on stdout and as JSON (``<timestamp>.json`` and ``latest.json`` in the results dir)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.load import LoadResult


def ratio(value: float, base: float) -> float | None:
    return round(value / base, 3) if base else None


def compare(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> None:
    """Fill ``added_latency_ms`` (over direct, one connection) and ``vs_bare`` (ratios to the
    bare proxy with the same request and worker count) for a gateway or proxy row."""
    tp: dict[str, Any] | None = row.get("throughput")
    lat: dict[str, Any] | None = row.get("latency")
    direct = rows.get(row.get("direct") or "")
    if lat and direct and direct.get("latency"):
        d = direct["latency"]
        row["added_latency_ms"] = {
            "p50": round(lat["p50_ms"] - d["p50_ms"], 3),
            "p99": round(lat["p99_ms"] - d["p99_ms"], 3),
            "p999": round(lat["p999_ms"] - d["p999_ms"], 3),
        }
    bare = rows.get(row.get("bare") or "")
    if bare and bare is not row and tp and bare.get("throughput"):
        b, bl = bare["throughput"], bare.get("latency") or {}
        row["vs_bare"] = {
            "rps": ratio(tp["rps"], b["rps"]),
            "p50": ratio(tp["p50_ms"], b["p50_ms"]),
            "p99": ratio(tp["p99_ms"], b["p99_ms"]),
            "p999": ratio(tp["p999_ms"], b["p999_ms"]),
        }
        if lat and bl:
            row["vs_bare"]["c1_p50"] = ratio(lat["p50_ms"], bl["p50_ms"])
            row["vs_bare"]["c1_p99"] = ratio(lat["p99_ms"], bl["p99_ms"])
        bare_added = bare.get("added_latency_ms")
        if bare_added and row.get("added_latency_ms"):
            row["vs_bare"]["added_p50"] = ratio(row["added_latency_ms"]["p50"], bare_added["p50"])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'scenario':<26}{'req/s':>9}{'p50':>8}{'p99':>8}{'p99.9':>8} |"
        f"{'1c p50':>8}{'1c p99':>8}{'1c p99.9':>10} |{'+p50':>7}{'+p99':>7} |"
        f"{'x rps':>7}{'x p50':>7}{'x p99':>7}  note"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        name = row["name"]
        if row.get("skipped"):
            lines.append(f"{name:<26}{'skipped: ' + row['skipped']}")
            continue
        tp = row.get("throughput") or {}
        lat = row.get("latency") or {}
        added = row.get("added_latency_ms") or {}
        vs = row.get("vs_bare") or {}
        note = row.get("error") or ""
        lines.append(
            f"{name:<26}{tp.get('rps', 0):>9.0f}{_ms(tp.get('p50_ms')):>8}{_ms(tp.get('p99_ms')):>8}"
            f"{_ms(tp.get('p999_ms')):>8} |{_ms(lat.get('p50_ms')):>8}{_ms(lat.get('p99_ms')):>8}"
            f"{_ms(lat.get('p999_ms')):>10} |{_ms(added.get('p50')):>7}{_ms(added.get('p99')):>7} |"
            f"{_x(vs.get('rps')):>7}{_x(vs.get('p50')):>7}{_x(vs.get('p99')):>7}  {note}"
        )
    lines.append(
        "latencies in ms; 'c' columns at the throughput concurrency, '1c' at one connection; +p50/+p99: added "
        "latency over the upstream direct (1 connection); x: ratio to the bare aiohttp proxy in the same run"
    )
    return "\n".join(lines)


def result_json(result: LoadResult | None) -> dict[str, Any] | None:
    return result.to_json() if result is not None else None


def write(report: dict[str, Any], out_dir: Path, stamp: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, sort_keys=False) + "\n"
    path = out_dir / f"{stamp}.json"
    path.write_text(text)
    (out_dir / "latest.json").write_text(text)
    return path

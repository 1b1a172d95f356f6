"""The benchmark's report: every measurement with its ratios to the same run's baselines, as a
table on stdout and as JSON (``<timestamp>.json`` and ``latest.json`` in the results dir)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.load import LoadResult


def ratio(value: float, base: float) -> float | None:
    return round(value / base, 3) if base else None


def _median_by(items: list[dict[str, Any]], key: str) -> dict[str, Any]:
    ordered = sorted(items, key=lambda item: item[key])
    return ordered[(len(ordered) - 1) // 2]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def settle(row: dict[str, Any]) -> None:
    """A row's figures: the median round by throughput and, apart, by one-connection p50."""
    rounds = row["rounds"]
    row["throughput"] = _median_by([r["throughput"] for r in rounds], "rps")
    row["latency"] = _median_by([r["latency"] for r in rounds], "p50_ms")
    row["rps_by_round"] = [r["throughput"]["rps"] for r in rounds]


def _paired(row: dict[str, Any], other: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Round i of ``row`` with round i of ``other`` (measured minutes apart at most); when the
    rounds do not line up, the settled figures alone."""
    mine, theirs = row.get("rounds") or [], other.get("rounds") or []
    if mine and len(mine) == len(theirs):
        return list(zip(mine, theirs, strict=True))
    return [({"throughput": row["throughput"], "latency": row["latency"]}, other)]


def compare(row: dict[str, Any], rows: dict[str, dict[str, Any]]) -> None:
    """Fill ``added_latency_ms`` (over direct, one connection) and ``vs_bare`` (ratios to the
    bare proxy with the same request and worker count) for a gateway or proxy row. With
    several rounds each ratio is taken within a round, then the median across rounds."""
    if not row.get("throughput") or not row.get("latency"):
        return
    direct = rows.get(row.get("direct") or "")
    if direct and direct is not row and direct.get("latency"):
        pairs = _paired(row, direct)
        row["added_latency_ms"] = {
            q: round(_median([a["latency"][f"{q}_ms"] - b["latency"][f"{q}_ms"] for a, b in pairs]), 3)
            for q in ("p50", "p99", "p999")
        }
    bare = rows.get(row.get("bare") or "")
    if not bare or bare is row or not bare.get("throughput"):
        return
    pairs = _paired(row, bare)

    def med(run: str, field: str) -> float | None:
        values = [ratio(a[run][field], b[run][field]) for a, b in pairs]
        known = [v for v in values if v is not None]
        return round(_median(known), 3) if known else None

    row["vs_bare"] = {
        "rps": med("throughput", "rps"),
        "p50": med("throughput", "p50_ms"),
        "p99": med("throughput", "p99_ms"),
        "p999": med("throughput", "p999_ms"),
        "c1_p50": med("latency", "p50_ms"),
        "c1_p99": med("latency", "p99_ms"),
    }


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

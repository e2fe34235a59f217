"""Medians over rounds, the issue's ratios, and the Markdown table for the README."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

NAMES = {
    "a": "(a) bare aiokafka consumer, read and discard (broker ceiling)",
    "b": "(b) engine's batch transaction from memory, no Kafka (database ceiling)",
    "c": "(c) `milestones run`, first fetch → last offset commit",
    "c+": "(c) `milestones run`, process start → last offset commit",
    "d": "(d) one transaction + one offset commit per event",
    "e": "(e) two `milestones run` in one group",
    "f": "(f) latency at a steady rate",
}


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per scenario, and the ratios of the medians."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        by[result["scenario"]].append(result)
    medians: dict[str, dict[str, Any]] = {}
    for letter, rows in by.items():
        entry: dict[str, Any] = {"rounds": len(rows)}
        for key in ("events_per_s", "events_per_s_with_start", "decode_events_per_s", "join_seconds",
                    "mean_batch", "engine_cpu_us_per_event", "postgres_cpu_us_per_event",
                    "commit_p50_ms", "commit_p99_ms", "milestone_p50_ms", "milestone_p99_ms",
                    "rate_achieved"):
            if key in rows[0]:
                entry[key] = _median([row[key] for row in rows])
        rss = [max(row["peak_rss_mb"]) if isinstance(row["peak_rss_mb"], list) else row["peak_rss_mb"]
               for row in rows if "peak_rss_mb" in row]
        if rss:
            entry["peak_rss_mb"] = max(rss)
        entry["per_round"] = [row.get("events_per_s") for row in rows]
        entry["checks"] = sorted({row.get("check", "ok") for row in rows})
        if "cpu" in rows[0]:
            entry["cpu"] = rows[len(rows) // 2]["cpu"]
        medians[letter] = entry

    def rate(letter: str) -> float | None:
        value = medians.get(letter, {}).get("events_per_s")
        return value if value else None

    ratios: dict[str, float] = {}
    engine = rate("c")
    for name, letter in (("engine/(a)", "a"), ("engine/(b)", "b"), ("engine/(d)", "d")):
        other = rate(letter)
        if engine and other:
            ratios[name] = engine / other
    if engine and rate("e"):
        ratios["two/one"] = rate("e") / engine  # type: ignore[operator]
    return {"medians": medians, "ratios": ratios}


def _cores(cpu: dict[str, Any], data: dict[str, Any]) -> str:
    """Who kept the machine busy during the timed window, in cores."""
    if not cpu:
        return ""
    engines = "+".join(f"{value:.2f}" for value in cpu["engine_cores"])
    return (f"cores busy {cpu['machine_cores_busy']:.2f} of {data['machine']['before']['cores']}: "
            f"engine {engines}, postgres {cpu['postgres_cores']:.2f}, broker {cpu['broker_cores']:.2f}, "
            f"other {cpu['other_cores']:.2f}")


def _per_event(entry: dict[str, Any]) -> str:
    engine, postgres = entry.get("engine_cpu_us_per_event"), entry.get("postgres_cpu_us_per_event")
    if engine is None or postgres is None:
        return ""
    return f"CPU per event: engine {engine:.0f} µs, postgres {postgres:.0f} µs"


def _rate(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.0f}"


def _rounds(entry: dict[str, Any]) -> str:
    values = [v for v in entry.get("per_round", []) if v]
    return " / ".join(f"{v / 1000:.1f}k" for v in values) if len(values) > 1 else ""


def one_line(result: dict[str, Any]) -> str:
    """The progress line of one measurement."""
    if "commit_p50_ms" in result:
        text = (f"commit p50 {result['commit_p50_ms']:.0f} ms p99 {result['commit_p99_ms']:.0f} ms, "
                f"milestone p50 {result['milestone_p50_ms']:.0f} ms p99 {result['milestone_p99_ms']:.0f} ms")
    else:
        text = f"{result['events_per_s']:,.0f} events/s"
        if "events_per_s_with_start" in result:
            text += f" ({result['events_per_s_with_start']:,.0f}/s with start)"
    if result.get("check", "ok") != "ok":
        text += f" CHECK: {result['check']}"
    return text


def render(data: dict[str, Any]) -> str:
    summary = data["summary"]
    medians, ratios = summary["medians"], summary["ratios"]
    config = data["config"]
    lines = [
        "| measurement | events/s (median) | rounds | peak RSS MiB | notes |",
        "|---|---:|---|---:|---|",
    ]

    def row(key: str, value: str, entry: dict[str, Any], notes: str = "") -> None:
        rss = entry.get("peak_rss_mb")
        lines.append(f"| {NAMES[key]} | {value} | {_rounds(entry) or entry.get('rounds', '')} | "
                     f"{'' if rss is None else f'{rss:.0f}'} | {notes} |")

    if "a" in medians:
        row("a", _rate(medians["a"]["events_per_s"]), medians["a"])
    if "b" in medians:
        entry = medians["b"]
        row("b", _rate(entry["events_per_s"]), entry,
            f"decode alone {_rate(entry.get('decode_events_per_s'))}/s; {_per_event(entry)} "
            "(decode included); RSS holds all events")
    if "c" in medians:
        entry = medians["c"]
        cpu = entry.get("cpu", {})
        row("c", _rate(entry["events_per_s"]), entry,
            f"{_cores(cpu, data)}; {_per_event(entry)}; {entry.get('mean_batch') or '?'} events per batch")
        lines.append(f"| {NAMES['c+']} | {_rate(entry.get('events_per_s_with_start'))} | | | "
                     f"start and group join {entry.get('join_seconds', float('nan')):.1f} s |")
    if "d" in medians:
        row("d", _rate(medians["d"]["events_per_s"]), medians["d"],
            f"time-boxed {config['per_event_seconds']:g} s")
    if "e" in medians:
        entry = medians["e"]
        cpu = entry.get("cpu", {})
        row("e", _rate(entry["events_per_s"]), entry,
            f"both instances together; {_cores(cpu, data)}")
    if "f" in medians:
        entry = medians["f"]
        lines.append(
            f"| {NAMES['f']} ({config['latency_rate']:,}/s for {config['latency_seconds']:g} s) | "
            f"{_rate(entry.get('rate_achieved'))} | {entry['rounds']} | "
            f"{entry.get('peak_rss_mb', float('nan')):.0f} | "
            f"produce → count committed p50 {entry['commit_p50_ms']:.0f} ms, "
            f"p99 {entry['commit_p99_ms']:.0f} ms;"
            f" produce → `milestone.reached` p50 {entry['milestone_p50_ms']:.0f} ms, "
            f"p99 {entry['milestone_p99_ms']:.0f} ms |"
        )
    out = ["", "\n".join(lines), ""]
    if ratios:
        out.append("Ratios of medians: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    workload = data["workload"]
    out.append(
        f"Workload: {workload['events']:,} events ({workload['duplicates']:,} duplicates), "
        f"{config['mentors']:,} mentors (Zipf skew), {config['partitions']} partitions, "
        f"{config['seed_rows']:,} earlier ledger rows, {workload['expected_milestones']:,} milestones; "
        f"{config['rounds']} round(s)."
    )
    machine = data["machine"]
    before, after = machine["before"], machine["after"]
    load_before, load_after = ("/".join(map(str, m["load_average"])) for m in (before, after))
    out.append(
        f"Machine: {before['cores']} cores ({before['cpu']}), {before['memory_gib']} GiB; load average "
        f"{load_before} before, {load_after} after; "
        f"Python {before['python']}, PostgreSQL {machine['postgres']}, aiokafka {machine['aiokafka']}, "
        f"asyncpg {machine['asyncpg']}, uvloop {machine['uvloop']}; broker Tansu (memory)."
    )
    failed = {k: v["checks"] for k, v in medians.items() if v["checks"] != ["ok"]}
    out.append("Checks: " + ("all ok (every session counted once, every milestone recorded and sent)"
                             if not failed else f"FAILED {failed}"))
    out.append(f"Command: `{data['command']}` ({data['wall_seconds']:.0f} s)")
    profile = data.get("profile")
    if profile:
        out.append("")
        out.append(render_profile(profile))
    return "\n".join(out)


def render_profile(profile: dict[str, Any]) -> str:
    if "error" in profile:
        return f"Profile: {profile['error']}"
    lines = [
        f"Profile of one extra (c) run under py-spy: {profile['samples']} samples over "
        f"{profile['seconds']} s, engine thread on CPU {profile['on_cpu']:.0%} of the time, "
        f"{profile['events_per_s_while_profiled']:,.0f} events/s while profiled.",
        "",
        "| self % | where (area) |",
        "|---:|---|",
    ]
    lines += [f"| {share} | {name} |" for name, share in profile["area_self_percent"]]
    lines += ["", "| self % | function |", "|---:|---|"]
    lines += [f"| {share} | {name} |" for name, share in profile["self_percent"]]
    lines += ["", "| inclusive % | function |", "|---:|---|"]
    lines += [f"| {share} | {name} |" for name, share in profile["inclusive_percent"]]
    return "\n".join(lines)

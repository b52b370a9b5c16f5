"""``make faults``: run the fault scenarios against the real agent and write bench/faults.md.

    python -m faults.run                  every scenario, full size (long: about an hour)
    python -m faults.run --quick          every scenario, the short tier's sizes
    python -m faults.run kill9 wms_down   only these
    python -m faults.run --merge modbus   only these, their rows and sections replaced in
                                          bench/faults.md (the other scenarios' kept)

Exits non-zero when any target is missed, a scenario breaks, or one is not built yet: a miss
is printed and written to the table, never hidden. A scenario that cannot run on this machine
(e.g. it needs root) is a SKIP with its reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import psutil

from .scenarios import DRAIN_FACTOR, ONE_COMMIT_MB, RSS_LIMIT_MB, SCENARIOS, Result, run

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "faults.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    os_name = platform.platform()
    try:
        rel = dict(line.split("=", 1) for line in
                   Path("/etc/os-release").read_text().splitlines() if "=" in line)
        os_name = f"{rel.get('PRETTY_NAME', '').strip(chr(34))} (Linux {platform.release()})"
    except OSError:
        pass
    ram = psutil.virtual_memory().total / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GB RAM, {os_name}, "
            f"Python {platform.python_version()}")


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[Result], *, quick: bool, started: str, secs: float) -> str:
    rows = [
        "# Fault suite results",
        "",
        f"Written by `make faults` ({'--quick sizes' if quick else 'full sizes'}) on {started}, "
        f"{secs / 60:.1f} min.",
        "",
        f"Machine: {machine()}.",
        "",
        "Each scenario runs the real agent (`edge-agent run`), a real mosquitto and real HTTP "
        "receivers; the suite's own devices publish at QoS 1 and every message the broker "
        "acknowledged is an obligation (`faults/ledger.py`). Targets: lost, invented, wrong, "
        "duplicate facts, out of order and re-sends to a healthy receiver all 0; no agent exit "
        f"but our kill -9s; peak RSS <= {RSS_LIMIT_MB:.0f} MB through the WMS outage; outbox "
        f"<= quota + one commit ({ONE_COMMIT_MB:.0f} MB); drain after an outage >= "
        f"{DRAIN_FACTOR:.0f}x the ingest rate (WMS events/s).",
        "",
        "| scenario | result | cartons/s | s | cartons | obligations | lost | invented | wrong "
        "| dup deliveries | dup facts | out of order | healthy re-sends | dead (rejected) "
        "| kill -9 | agent exits | peak RSS MB | max disk MB (quota) | drain/s vs ingest/s "
        "| first delivery after outage s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.counts
        quota = f" ({r.quota_mb:.0f})" if r.quota_mb is not None else ""
        drain = (f"{_fmt(r.drain_per_s)} vs {_fmt(r.ingest_per_s)}"
                 if r.ingest_per_s else "-")
        rows.append(
            f"| {r.name} | {r.status} | {r.rate:.0f} | {r.secs:.0f} | {r.cartons} "
            f"| {r.obligations} | {c.get('lost', '-')} | {c.get('invented', '-')} "
            f"| {c.get('wrong', '-')} | {c.get('dup_deliveries', '-')} | {c.get('dup_facts', '-')} "
            f"| {c.get('out_of_order', '-')} | {c.get('healthy_resends', '-')} "
            f"| {c.get('dead', '-')} | {r.kills} | {r.exits} | {r.peak_rss_mb:.0f} "
            f"| {r.max_disk_mb:.1f}{quota} | {drain} | {_fmt(r.recovery_secs, '.1f')} |")
    rows += ["", "## Per scenario", ""]
    for r in results:
        rows.append(f"### {r.name}: {r.title} ({r.status})")
        rows.append("")
        if r.reason:
            rows.append(f"- {r.reason}")
        for m in r.misses:
            rows.append(f"- missed: {m}")
        for n in r.notes:
            if "\n" in n:
                rows += ["", "```", n.strip()[-2000:], "```", ""]
            else:
                rows.append(f"- {n}")
        if r.ledger_lines:
            rows += ["", "```", *r.ledger_lines, "```"]
        for tail in r.exit_tails:
            rows += ["", "agent exit, log tail:", "```", tail.strip()[-1500:], "```"]
        rows.append("")
    return "\n".join(rows) + "\n"


def _split(text: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """A results file: (header lines up to the table, rows by scenario, sections by
    scenario)."""
    lines = text.rstrip("\n").split("\n")
    header: list[str] = []
    rows: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    i = 0
    while i < len(lines) and not lines[i].startswith("| scenario |"):
        header.append(lines[i])
        i += 1
    i += 2  # the column names and the |---| line
    while i < len(lines) and lines[i].startswith("| "):
        rows[lines[i].split("|")[1].strip()] = lines[i]
        i += 1
    current: list[str] | None = None
    for line in lines[i:]:
        if line.startswith("### "):
            current = sections[line[4:].split(":", 1)[0].strip()] = [line]
        elif current is not None:
            current.append(line)
    return header, rows, {k: "\n".join(v).rstrip("\n") for k, v in sections.items()}


def merge(old: str, new: str, updated: str) -> str:
    """``new`` (a table of some scenarios) into ``old`` (a whole table): their rows and
    sections replace the old ones, the others are kept; ``updated`` is added to the header
    (what was run again, when, at which sizes)."""
    old_header, old_rows, old_sections = _split(old)
    _, new_rows, new_sections = _split(new)
    rows = {**old_rows, **new_rows}
    sections = {**old_sections, **new_sections}
    order = [n for n in SCENARIOS if n in rows] + [n for n in rows if n not in SCENARIOS]
    head = list(old_header)
    while head and not head[-1].strip():
        head.pop()
    at = next((i for i, h in enumerate(head) if h.startswith("Machine:")), len(head))
    head.insert(at, updated)
    head.insert(at + 1, "")
    new_lines = new.split("\n")
    cols = next(i for i, line in enumerate(new_lines) if line.startswith("| scenario |"))
    out = [*head, "", *new_lines[cols:cols + 2], *(rows[n] for n in order), "",
           "## Per scenario", ""]
    for n in order:
        if n in sections:
            out += [sections[n], ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m faults.run", description=__doc__.split("\n")[0])
    p.add_argument("scenarios", nargs="*", help=f"any of: {', '.join(SCENARIOS)}")
    p.add_argument("--quick", action="store_true", help="the short tier's sizes")
    p.add_argument("--out", type=Path, default=OUT, help="results table (markdown)")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: temp)")
    p.add_argument("--merge", action="store_true",
                   help="replace only these scenarios' rows and sections in --out, keep the rest")
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    names = args.scenarios or list(SCENARIOS)
    base = args.workdir or Path(tempfile.mkdtemp(prefix="faults-"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.monotonic()
    results: list[Result] = []
    for name in names:
        wd = base / name
        shutil.rmtree(wd, ignore_errors=True)
        print(f"== {name}: {SCENARIOS[name].title}", flush=True)
        r = run(SCENARIOS[name], wd, quick=args.quick)
        results.append(r)
        print(f"   {r.status} in {r.secs:.0f} s; {r.cartons} cartons; "
              f"{json.dumps(r.counts)}; kills {r.kills}, exits {r.exits}, "
              f"peak RSS {r.peak_rss_mb:.0f} MB" + (f"; {r.reason}" if r.reason else ""),
              flush=True)
        for m in r.misses:
            print(f"   missed: {m}", flush=True)
    text = table(results, quick=args.quick, started=started, secs=time.monotonic() - t0)
    if args.merge and args.out.exists():
        text = merge(args.out.read_text(), text,
                     f"Updated: {', '.join(names)} by `make faults` "
                     f"({'--quick sizes' if args.quick else 'full sizes'}) on {started}, "
                     f"{(time.monotonic() - t0) / 60:.1f} min; the other rows are from the "
                     f"run above.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (base / "faults.json").write_text(
        json.dumps([asdict(r) for r in results], indent=1, default=str))
    print(f"wrote {args.out}; logs in {base}")
    bad = [r.name for r in results if r.status in ("FAIL", "ERROR")]
    if bad:
        print(f"targets missed in: {', '.join(bad)}", file=sys.stderr)
        return 1
    if args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

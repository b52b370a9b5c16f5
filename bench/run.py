"""``make bench``: the carton-close flow at increasing rates; writes bench/results.md and .json.

    python -m bench.run                       # ladder 250..3000 cartons/s, 10 s a step, 3 runs each
    python -m bench.run --repeat 1            # one run per step
    python -m bench.run --rates 1000,2000 --seconds 20
    python -m bench.run --quick               # smoke test: one 5 s step at 500/s (< 1 min)
    python -m bench.run --profile-rate 1000   # also one step with py-spy on the agent

See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from simulators.broker import find_mosquitto

from .carton_flow import (
    MIN_CARTONS,
    P99_TARGET_MS,
    RATE_TOLERANCE,
    ROOT,
    machine_load_pct,
    median_step,
    run_step,
    summarise_profile,
)

HERE = Path(__file__).resolve().parent
DEFAULT_RATES = (250, 500, 1000, 1500, 2000, 2500, 3000)
TARGET_RATE = 2000.0
TARGET_CPU_MS = 0.4
TARGET_RSS_MB = 120.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (r.stdout or r.stderr).strip()


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    exe = find_mosquitto()
    mosq = _run([exe, "-h"]).splitlines()[0] if exe else "not installed"
    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = [ln for ln in _run(["git", "status", "--porcelain"]).splitlines() if ln.strip()]
    versions = {}
    for pkg in ("paho-mqtt", "aiohttp", "httpx", "pydantic"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu_model": cpu_model,
        "logical_cpus": psutil.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}",
        "mosquitto": mosq,
        "sqlite": sqlite3.sqlite_version,
        "packages": versions,
        "git_commit": commit + (f" (+{len(dirty)} uncommitted files)" if dirty else ""),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def wait_for_quiet(max_pct: float, timeout_secs: float) -> float:
    """Wait until the machine (without us) is below `max_pct` of one core; returns the last
    load seen. Other people's tests share this machine; they would skew every figure."""
    deadline = time.monotonic() + timeout_secs
    load = machine_load_pct(1.0)
    announced = False
    while load > max_pct and time.monotonic() < deadline:
        if not announced:
            log(f"  machine busy with other work ({load:.0f}% of a core); waiting for it to calm down")
            announced = True
        load = machine_load_pct(2.0)
    if load > max_pct:
        log(f"  still {load:.0f}% busy with other work after {timeout_secs:.0f}s; measuring anyway")
    return round(load, 1)


# --- report -----------------------------------------------------------------------------------


def _f(v: Any, fmt: str = "{:.0f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def verdicts(steps: list[dict[str, Any]]) -> dict[str, Any]:
    meds = [s["median"] for s in steps if s.get("median") and s["median"].get("latency")]
    passed = [m for m in meds if m["passed"]]
    best = max((m["rate"] for m in passed), default=None)
    out: dict[str, Any] = {"highest_sustained_rate": best}
    tried = max((m["rate"] for m in meds), default=0.0)
    result = f"{best:.0f} cartons/s" if best else "no step sustained"
    if best and best == tried and tried < TARGET_RATE:
        result += " (nothing faster was tried)"
    out["throughput"] = {
        "target": f">= {TARGET_RATE:.0f} cartons/s sustained, exactly once, p99 < {P99_TARGET_MS:.0f} ms to HTTP and MQTT",
        "result": result,
        "met": bool(best and best >= TARGET_RATE),
    }
    # CPU per carton: at the target rate when it was run, else at the highest rate run.
    at = next((m for m in meds if m["rate"] == TARGET_RATE), None) or (
        max(meds, key=lambda m: m["rate"]) if meds else None
    )
    cpu = at.get("agent_cpu_ms_per_carton") if at else None
    out["cpu"] = {
        "target": f"<= {TARGET_CPU_MS} ms agent CPU per carton",
        "result": (f"{cpu:.3f} ms at {at['rate']:.0f}/s" if cpu is not None and at else "n/a")
        + (f" (range {min(c):.3f}-{max(c):.3f} over the steps)" if (c := [
            m["agent_cpu_ms_per_carton"] for m in meds if m.get("agent_cpu_ms_per_carton") is not None
        ]) else ""),
        "met": cpu is not None and cpu <= TARGET_CPU_MS,
    }
    rss = [m["agent_peak_rss_mb"] for m in meds if m.get("agent_peak_rss_mb") is not None]
    peak = max(rss) if rss else None
    out["memory"] = {
        "target": f"<= {TARGET_RSS_MB:.0f} MB agent peak memory (VmHWM)",
        "result": f"{peak:.1f} MB (highest over the steps run)" if peak is not None else "n/a",
        "met": peak is not None and peak <= TARGET_RSS_MB,
    }
    return out


def _bus_recorder_text(report: dict[str, Any]) -> str:
    kinds = {r.get("bus_recorder") for s in report["steps"] for r in s["runs"]} - {None}
    names = {"MosqSubRecorder": "`mosquitto_sub` (QoS 1, MQTT 5)",
             "BusRecorderProc": "`simulators.bus_recorder.BusRecorder` (paho) in a subprocess"}
    return " and ".join(sorted(names.get(k, k) for k in kinds)) or "a subscriber"


def _avg(samples: list[dict[str, Any]], second: int, key: str) -> float | None:
    """Mean of the half-second load samples within wall-clock second `second` of the window
    (the window opens when the line starts; device time runs from the first scan, close by)."""
    vals = [x[key] for x in samples if second < x["t"] <= second + 1 and x.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    k = report["repeat"]
    lines = [
        "# Benchmark: carton-close flow",
        "",
        f"Written by `python -m bench.run` on {report['date']}. Command: `{report['command']}`",
        "",
        "Each step runs a fresh mosquitto, stand-in WMS and ERP (HTTP), an MQTT bus recorder and "
        "`edge-agent run` with a new outbox, then the simulated line publishes "
        f"max({MIN_CARTONS}, rate x {report['seconds']:g} s) cartons with no faults (each carton "
        "is one scan, one weight 50-300 ms later, one `carton_closed`). "
        + (f"Figures are medians of {k} runs per step." if k > 1 else "One run per step (no median).")
        + " Everything runs on the same machine. The MQTT side is measured by "
        + _bus_recorder_text(report) + ".",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu_model']} ({m['logical_cpus']} logical CPUs, {m['physical_cores']} physical) |",
        f"| RAM | {m['ram_gib']} GiB |",
        f"| Python | {m['python']} |",
        f"| Kernel | {m['kernel']} |",
        f"| Broker | {m['mosquitto']} |",
        f"| SQLite | {m['sqlite']} |",
        f"| Packages | {', '.join(f'{p} {v}' for p, v in m['packages'].items())} |",
        f"| Git commit | {m['git_commit']} |",
        f"| Load average at start | {', '.join(str(x) for x in m['loadavg_at_start'])} |",
        "",
        "## Verdict",
        "",
        "| Target | Result | Met |",
        "|---|---|---|",
    ]
    v = report["verdict"]
    for key in ("throughput", "cpu", "memory"):
        t = v[key]
        lines.append(f"| {t['target']} | {t['result']} | {'yes' if t['met'] else '**no**'} |")
    lines += [
        "",
        "## Per rate",
        "",
        ("Latency is from the later of the carton's two device timestamps (`ts` of the scan and "
        "of the weight, as copied into `scan_time`/`weigh_time`) to arrival at the receiver "
        "(`_received_at` at the HTTP receiver, receive time at the MQTT subscriber). "
        "Achieved rate is measured from the scans' device timestamps. Agent CPU is user+system "
        "of all its threads from just before the line starts to the last delivery."),
        "",
        ("| Rate asked /s | Achieved /s | Exactly once WMS / ERP / MQTT | HTTP (WMS) p50 / p99 / max ms "
        "| ERP p99 ms | MQTT p50 / p99 / max ms | Agent CPU ms/carton | Agent CPU % of a core "
        "| Agent RSS start / peak MB | Result |"),
        "|---:|---:|---|---|---:|---|---:|---:|---|---|",
    ]
    for s in report["steps"]:
        md = s.get("median") or {}
        if not md.get("latency"):
            lines.append(f"| {s['rate']:.0f} | error | | | | | | | | {'; '.join(md.get('failures', []))} |")
            continue
        lat = md["latency"]
        runs = s["runs"]
        once = " / ".join(
            "yes" if all(r.get("ledgers", {}).get(n, {}).get("ok") for r in runs) else "**no**"
            for n in ("wms", "erp", "bus")
        )
        agent_pct = md["cpu_pct_of_one_core"].get("agent")
        result = "pass" if md["passed"] else "**fail**: " + "; ".join(md["failures"])
        lines.append(
            f"| {md['rate']:.0f} | {_f(md['achieved_rate'])} | {once} "
            f"| {_f(lat['wms']['p50_ms'])} / {_f(lat['wms']['p99_ms'])} / {_f(lat['wms']['max_ms'])} "
            f"| {_f(lat['erp']['p99_ms'])} "
            f"| {_f(lat['bus']['p50_ms'])} / {_f(lat['bus']['p99_ms'])} / {_f(lat['bus']['max_ms'])} "
            f"| {_f(md['agent_cpu_ms_per_carton'], '{:.3f}')} | {_f(agent_pct)} "
            f"| {_f(md['agent_rss_start_mb'], '{:.1f}')} / {_f(md['agent_peak_rss_mb'], '{:.1f}')} "
            f"| {result} |"
        )
    ncpu = m["logical_cpus"]
    lines += [
        "",
        "## Who uses the CPU",
        "",
        (f"CPU of each process during the step, in % of one core (the machine has {ncpu}, so "
        f"{ncpu * 100} % is everything). *Line* is the carton-line simulator (whole run, start-up "
        "included); *other* is whatever else the machine ran meanwhile (not part of this "
        "benchmark: e.g. someone else's tests); *settle* is how long deliveries took to "
        "complete after the line finished publishing."),
        "",
        "| Rate /s | agent | broker | line | WMS | ERP | bus recorder | harness | other | machine busy | line max lag ms | settle s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["steps"]:
        md = s.get("median") or {}
        if not md.get("cpu_pct_of_one_core"):
            continue
        c = md["cpu_pct_of_one_core"]
        lines.append(
            f"| {md['rate']:.0f} | {_f(c.get('agent'))} | {_f(c.get('broker'))} | {_f(c.get('line'))} "
            f"| {_f(c.get('wms'))} | {_f(c.get('erp'))} | {_f(c.get('bus_recorder'))} "
            f"| {_f(c.get('harness'))} | {_f(md.get('other_load_pct'))} | {_f(md.get('machine_busy_pct'))} "
            f"| {_f(md.get('line_max_lag_ms'))} | {_f(md.get('settle_secs'), '{:.1f}')} |"
        )
    for s in report["steps"]:
        md = s.get("median") or {}
        if md.get("passed") or not s["runs"] or "timeline" not in s["runs"][0]:
            continue
        r = s["runs"][0]
        tl = r["timeline"]
        per_s = tl["latency_per_device_second"]
        load = tl["load_every_half_second"]
        lines += [
            "",
            f"### {s['rate']:.0f}/s (failed), second by second (run 1)",
            "",
            "| second of the run | " + " | ".join(str(b["s"]) for b in per_s["wms"]) + " |",
            "|---|" + "---:|" * len(per_s["wms"]),
            "| cartons | " + " | ".join(str(b["n"]) for b in per_s["wms"]) + " |",
            "| WMS p99 ms | " + " | ".join(_f(b["p99_ms"]) for b in per_s["wms"]) + " |",
            "| MQTT p99 ms | " + " | ".join(_f(b["p99_ms"]) for b in per_s["bus"]) + " |",
            "| agent CPU % | " + " | ".join(_f(_avg(load, b["s"], "agent_pct")) for b in per_s["wms"]) + " |",
            "| machine busy % | " + " | ".join(_f(_avg(load, b["s"], "machine_busy_pct")) for b in per_s["wms"]) + " |",
        ]
    codes = {(r.get("git_commit"), r.get("agent_sources")) for s in report["steps"] for r in s["runs"]}
    codes.discard((None, None))
    if len(codes) > 1:
        lines += ["", "**Note: the agent's code changed during this benchmark** (the tree was being "
                  "worked on): the steps ran " + ", ".join(
                      f"commit {c} / sources {h}" for c, h in sorted(codes, key=str))
                  + "; see `git_commit`/`agent_sources` per run in the JSON."]
    elif codes:
        c, h = next(iter(codes))
        lines += ["", f"Every run used the same agent sources (commit {c}, sources hash {h})."]
    if report.get("stopped_after"):
        lines += ["", (f"The ladder stopped after {report['stopped_after']:.0f}/s failed "
                  "(`--keep-going` climbs on).")]
    prof = report.get("profile")
    if prof and prof.get("summary"):
        ps = prof["summary"]
        lines += [
            "",
            f"## Profile of the agent at {prof['rate']:.0f} cartons/s",
            "",
            f"`py-spy record --threads --format raw` at 100 Hz on the agent for the whole step "
            f"({ps['samples']} non-idle samples over all threads; raw stacks: `{prof['raw']}`). "
            "Own = samples in the function itself (C code it calls included, e.g. SQLite under "
            "`Store.commit`); inclusive = samples with the agent's function anywhere on the stack. "
            "% of all non-idle samples. The profiled step's own figures are not in the tables "
            "above (py-spy pauses the agent to sample it)"
            + (f"; in it the agent used {pr['cpu_pct_of_one_core'].get('agent')} % of a core, "
               f"{pr['agent_cpu_ms_per_carton']} ms/carton, WMS p99 {pr['latency']['wms']['p99_ms']} ms."
               if "latency" in (pr := prof.get("run") or {}) else "."),
            "",
            "| # | Function (own time) | % |  | Agent function (inclusive) | % |",
            "|---:|---|---:|---|---|---:|",
        ]
        for i in range(max(len(ps["own"]), len(ps["inclusive"]))):
            o = ps["own"][i] if i < len(ps["own"]) else ("", "")
            n = ps["inclusive"][i] if i < len(ps["inclusive"]) else ("", "")
            lines.append(f"| {i + 1} | `{o[0]}` | {o[1]} | | `{n[0]}` | {n[1]} |")
        if ps.get("packages"):
            lines += ["", "Own samples per package: "
                      + ", ".join(f"{k} {v} %" for k, v in ps["packages"][:12]) + "."]
        if ps["threads"]:
            lines += ["", "Samples per thread: "
                      + ", ".join(f"{t.split(': ', 1)[-1]} {p} %" for t, p in ps["threads"]) + "."]
    lines += [
        "",
        "## How a step passes",
        "",
        f"- the line achieved at least {RATE_TOLERANCE:.0%} of the asked rate;",
        ("- the WMS, the ERP and the MQTT bus each got every carton's `carton_closed` exactly once "
        "(after the receiver's dedup by event id), with the expected values "
        "(`simulators.ledger.reconcile` against the line's ground truth);"),
        f"- p99 latency below {P99_TARGET_MS:.0f} ms at all three;",
        "- the agent exits 0 on SIGTERM.",
        "",
        "Raw figures of every run: `" + report["json_name"] + "`.",
        "",
    ]
    return "\n".join(lines)


def write(report: dict[str, Any], md_path: Path) -> None:
    report["verdict"] = verdicts(report["steps"])
    json_path = md_path.with_suffix(".json")
    report["json_name"] = json_path.name
    json_path.write_text(json.dumps(report, indent=2))
    md_path.write_text(render(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES),
                   help="comma-separated cartons/s, climbed in order")
    p.add_argument("--seconds", type=float, default=10.0, help="publishing time per step")
    p.add_argument("--repeat", type=int, default=3, help="runs per step; the table shows medians")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: one 5 s step at 500/s, 1 run, to bench/results-quick.md")
    p.add_argument("--keep-going", action="store_true", help="climb on after a failed step")
    p.add_argument("--keep", action="store_true", help="keep every step's work directory")
    p.add_argument("--profile-rate", type=float, default=None,
                   help="after the ladder, one more step at this rate with py-spy on the agent")
    p.add_argument("--quiet-below", type=float, default=30.0,
                   help="before each run, wait until other work uses less than this %% of a core")
    p.add_argument("--quiet-timeout", type=float, default=None,
                   help="longest wait for a quiet machine before each run, s (0: do not wait; "
                   "default 120, 10 with --quick)")
    p.add_argument("--bus-recorder", choices=["auto", "mosquitto_sub", "paho"], default="auto",
                   help="MQTT subscriber measuring the bus: mosquitto_sub (light, default when "
                   "installed) or simulators.bus_recorder (paho) in a subprocess")
    p.add_argument("--out", default=None,
                   help="markdown output (JSON next to it); default bench/results.md")
    args = p.parse_args(argv)

    if args.quick:
        rates, seconds, repeat = [500.0], 5.0, 1
    else:
        rates = [float(x) for x in args.rates.split(",") if x.strip()]
        seconds, repeat = args.seconds, max(1, args.repeat)
    if args.quiet_timeout is None:
        args.quiet_timeout = 10.0 if args.quick else 120.0
    out = Path(args.out) if args.out else HERE / ("results-quick.md" if args.quick else "results.md")
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": ("python -m bench.run " + shlex.join(sys.argv[1:] if argv is None else argv)).strip(),
        "machine": machine_info(),
        "rates": rates,
        "seconds": seconds,
        "repeat": repeat,
        "bus_recorder": args.bus_recorder,
        "targets": {"rate": TARGET_RATE, "p99_ms": P99_TARGET_MS, "cpu_ms_per_carton": TARGET_CPU_MS,
                    "peak_rss_mb": TARGET_RSS_MB},
        "steps": [],
    }
    log(f"bench: rates {', '.join(f'{r:g}' for r in rates)} cartons/s, {seconds:g} s each, "
        f"{repeat} run(s) per step -> {out}")
    for rate in rates:
        runs = []
        for i in range(repeat):
            quiet = wait_for_quiet(args.quiet_below, args.quiet_timeout) if args.quiet_timeout > 0 else None
            log(f"  {rate:g}/s run {i + 1}/{repeat} ...")
            r = run_step(rate, seconds, seed=args.seed, keep=args.keep,
                         bus_recorder=args.bus_recorder, log=log)
            r["other_load_before_pct"] = quiet
            runs.append(r)
            log("    " + _one_line(r))
        md = median_step(runs)
        report["steps"].append({"rate": rate, "runs": runs, "median": md})
        write(report, out)
        if not md["passed"]:
            log(f"  {rate:g}/s not sustained: {'; '.join(md['failures'])}")
            if not args.keep_going:
                report["stopped_after"] = rate
                break
    if args.profile_rate:
        if args.quiet_timeout > 0:
            wait_for_quiet(args.quiet_below, args.quiet_timeout)
        raw = Path(f"/tmp/edge-bench-profile-{args.profile_rate:g}.txt")
        log(f"  profiling the agent at {args.profile_rate:g}/s with py-spy -> {raw}")
        r = run_step(args.profile_rate, seconds, seed=args.seed, keep=args.keep,
                     profile_out=raw, bus_recorder=args.bus_recorder, log=log)
        log("    " + _one_line(r))
        summary = summarise_profile(raw) if raw.exists() else None
        report["profile"] = {"rate": args.profile_rate, "raw": str(raw), "run": r, "summary": summary}
    write(report, out)
    v = report["verdict"]
    log(f"bench: highest sustained {v['highest_sustained_rate'] or 'none'}; "
        f"throughput {'met' if v['throughput']['met'] else 'NOT met'}, "
        f"cpu {'met' if v['cpu']['met'] else 'NOT met'} ({v['cpu']['result']}), "
        f"memory {'met' if v['memory']['met'] else 'NOT met'} ({v['memory']['result']}); wrote {out}")
    # The benchmark ran; missing a target is a finding, not a crash. Errors are.
    return 1 if any("error" in r for s in report["steps"] for r in s["runs"]) else 0


def _one_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    lat = r["latency"]
    return (
        f"achieved {r['achieved_rate']:.0f}/s, exactly once {'yes' if r['delivered_ok'] else 'NO'}, "
        f"p99 wms {lat['wms']['p99_ms']} erp {lat['erp']['p99_ms']} bus {lat['bus']['p99_ms']} ms, "
        f"agent {r['agent_cpu_ms_per_carton']:.3f} ms/carton "
        f"({r['cpu_pct_of_one_core'].get('agent')} % of a core), peak {r['agent_peak_rss_mb']} MB, "
        f"other load {r.get('other_load_pct')} %, settle {r['settle_secs']} s"
        + ("" if r["passed"] else " -> FAIL: " + "; ".join(r["failures"]))
    )


if __name__ == "__main__":
    sys.exit(main())

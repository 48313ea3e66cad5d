#!/usr/bin/env python3
"""All benchmarks in one command (`make bench`): operator (emulator), operator vs the Job controller on the real
control plane, unrelated Pods (the server-side Pod selector), intake + events, GPU queues, worker. Each runs in its
own process, repeats its own measurements and reports median/min/max; this prints every headline figure in one
table at the end (the benchmarks' own detailed output streams above it).

    .venv/bin/python hack/bench.py [--quick] [--only operator,kubernetes,podwatch,intake,queues,worker]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchrows import parse

HACK = Path(__file__).parent
BENCHES = {
    "operator": (
        ["bench_operator.py"],
        ["bench_operator.py", "--burst", "300", "--steady-seconds", "3", "--resync", "2000"],
    ),
    "kubernetes": (
        ["bench_kubernetes.py"],
        ["bench_kubernetes.py", "--burst", "200", "--steady-seconds", "3", "--resync", "1000"],
    ),
    "podwatch": (["bench_pod_watch.py"], ["bench_pod_watch.py", "--pods", "500"]),
    "intake": (["bench_intake.py"], ["bench_intake.py", "--requests", "2000"]),
    "queues": (
        ["bench_queues.py"],
        ["bench_queues.py", "--pending", "2000", "--sim-seconds", "5000", "--burst", "100", "--repeat", "1"],
    ),
    "worker": (["bench_worker.py", "--repeat", "3"], ["bench_worker.py", "--repeat", "1", "--epochs", "40"]),
}


def fmt(value: float) -> str:
    return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not figures to quote)")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ", ".join(BENCHES))
    args = parser.parse_args()
    rows: list[tuple[str, dict[str, object]]] = []
    failed = []
    for name in args.only.split(","):
        full, quick = BENCHES[name]
        argv = [sys.executable, str(HACK / (quick if args.quick else full)[0]), *(quick if args.quick else full)[1:]]
        print(f"\n=== {name}: {' '.join(argv[1:])}", flush=True)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            found = parse(line)
            if found is None:
                print(line, end="", flush=True)
            else:
                rows.append((name, found))
        if proc.wait() != 0:
            failed.append(name)
    width = max((len(str(r["name"])) for _, r in rows), default=10)
    print(f"\n{'bench':<9} {'measure':<{width}} {'median':>12} {'min':>12} {'max':>12}  unit / note")
    for bench, r in rows:
        print(f"{bench:<9} {r['name']!s:<{width}} {fmt(float(r['median'])):>12} {fmt(float(r['min'])):>12} "  # type: ignore[arg-type]
              f"{fmt(float(r['max'])):>12}  {r['unit']} {r['note']}")  # type: ignore[arg-type]  # fmt: skip
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

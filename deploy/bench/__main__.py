"""`make bench`: how fast the shop is, and what its reliability costs.

Starts the full stack (PostgreSQL database `shop_bench`, recreated; a private Redis with
AOF; the gateway at latency 0; gunicorn, 5 processes of one thread; one worker per queue;
beat), then runs each scenario against its baseline in the same run, with a warm-up and
`--reps` repetitions, alternating which goes first. Prints a table (median, min, max of
the repetitions, and each goal checked on the median) and writes `bench.json`,
`bench.txt` and `bench.png` under `var/bench/`. Absolute figures drift on a shared
machine; the ratios are what to compare.
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from deploy.bench import report
from deploy.bench.rig import Bench
from deploy.bench.scenarios import SCENARIOS, Result
from deploy.stack import BASE_DIR, choose


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make bench", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each scenario")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--web-workers", type=int, default=5, help="gunicorn processes")
    parser.add_argument("--web-threads", type=int, default=1, help="threads per process")
    parser.add_argument("--orders", type=int, default=1000, help="orders per pipeline drain")
    parser.add_argument("--probes", type=int, default=200, help="enqueue probes of each kind")
    parser.add_argument("--probe-gap", type=float, default=0.01, help="seconds between probes")
    parser.add_argument("--reports", type=int, default=10_000, help="reports queued (5)")
    parser.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="share of the capacity measured in the same run placed open loop (2, 5)",
    )
    parser.add_argument("--samples", type=int, default=2000, help="charge waits per run (5)")
    parser.add_argument("--gateway-latency-ms", type=int, default=300, help="scenarios 2, 8")
    parser.add_argument(
        "--gateway-jitter-ms", type=int, default=50, help="plus uniform 0..this (8)"
    )
    parser.add_argument("--mail-latency-ms", type=int, default=100, help="scenario 8")
    parser.add_argument("--threads", type=int, default=32, help="threads per worker (8)")
    parser.add_argument("--rate-limit", type=int, default=50, help="the gateway's, calls/s (11)")
    parser.add_argument(
        "--limit-margin", type=float, default=0.95, help="the shop's limit / the gateway's (11)"
    )
    parser.add_argument("--limit-orders", type=int, default=2000, help="orders per drain (11)")
    parser.add_argument("--replays", type=int, default=10_000, help="dead letters replayed (11)")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--out", type=Path, default=BASE_DIR / "var" / "bench")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run that checks the harness, not speed"
    )
    parser.add_argument(
        "--keep-stack",
        action="store_true",
        help="keep the stack's folder (process logs, Redis files) after a run that succeeded",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/shop_bench"
        ),
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.seconds, args.orders, args.probes = 1, 1.0, 20, 10
        args.reports, args.samples, args.gateway_latency_ms = 100, 20, 50
        args.mail_latency_ms, args.gateway_jitter_ms, args.threads = 10, 5, 4
        args.rate_limit, args.limit_orders, args.replays = 20, 40, 40
    positive = ["reps", "seconds", "clients", "web_workers", "web_threads", "orders", "probes"]
    positive += ["reports", "load", "samples", "threads", "rate_limit", "limit_orders", "replays"]
    latencies = [args.gateway_latency_ms, args.gateway_jitter_ms, args.mail_latency_ms]
    if not 0 < args.limit_margin <= 1:
        parser.error("--limit-margin must be in (0, 1]")
    if any(getattr(args, name) <= 0 for name in positive) or min(latencies) < 0:
        parser.error(f"--{', --'.join(n.replace('_', '-') for n in positive)} must be positive")
    args.only = choose(parser, args.only, SCENARIOS, "scenario")
    return args


def main() -> int:
    args = parse_args()
    bench = Bench(
        database_url=args.database_url,
        clients=args.clients,
        web_workers=args.web_workers,
        web_threads=args.web_threads,
    )
    print(f"bench: stack in {bench.dir}", flush=True)
    results: list[Result] = []
    try:
        bench.start()
        for name in SCENARIOS:  # in this order: broker_down stops workers and Redis
            if name not in args.only:
                continue
            started = time.monotonic()
            # What runs beside it: a process left from an earlier scenario takes CPU and
            # database connections from this one (scenario 11 lost up to half its rate so).
            running = ", ".join(sorted(n for n, p in bench.procs.items() if p.poll() is None))
            print(f"bench: {name}... (running: {running})", flush=True)
            outcome = SCENARIOS[name](bench, args)
            results.extend(outcome if isinstance(outcome, tuple) else [outcome])
            report.keep_raw(results, args.out)  # an hour's figures outlive a later failure
            print(f"bench: {name} took {time.monotonic() - started:.0f} s", flush=True)
    finally:
        bench.stop()
    info = report.machine() | {"cpu_groups": bench.cpu.describe()}
    print("\n" + report.table(results, bench.peak_rss, info))
    report.write(results, bench.peak_rss, info, args.out, args)
    print(f"\nbench: wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    # The stack's logs and Redis files (hundreds of MB after 10,000 reports) are only
    # worth keeping when something failed (the exception leaves them) or when asked.
    if args.keep_stack:
        print(f"bench: the stack's folder is kept: {bench.dir}")
    else:
        shutil.rmtree(bench.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

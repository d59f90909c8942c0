"""Load test of `rargen serve`: N concurrent clients beside the same requests sent one at a time.

    python benchmarks/bench_serve.py runs/demo-quick/generator/final --tokenizer runs/demo-quick/tokenizer

Starts the real server (``python -m rargen serve``, default flags but ``--rate-limit 0`` so one
client address may send them all) on 127.0.0.1 on a free port, warms it up with one request,
then for each N in ``--clients`` (1,4,8,16) sends N single-image ``POST /generate`` requests
(classes and seeds differ, guidance as the demo samples) at once from N threads, and the same N
requests one after another. Prints a markdown table: wall time, images/s, p50/p95 latency, and
concurrent / sequential time (the continuous-batching gain). Bounded: every request times out
after ``--timeout`` s, and the server is stopped at the end.

``--compare-speculation`` (issue 30): the same load on a server with plain steps only
(``--speculate 0``, the server before speculation) and on one at default flags (exact speculation
where measured to pay), one after the other, and the speed-up of each row:

    python benchmarks/bench_serve.py runs/demo/generator --tokenizer runs/demo/tokenizer \
        --clients 1,8 --compare-speculation
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def post(host: str, port: int, body: dict, timeout: float) -> float:
    """Seconds for one /generate request (raises on anything but 200)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/generate", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {payload[:200]!r}")
    finally:
        conn.close()
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_concurrent(host, port, bodies, timeout) -> tuple[float, list[float]]:
    latencies: list[float] = [0.0] * len(bodies)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            latencies[i] = post(host, port, bodies[i], timeout)
        except BaseException as error:  # reported after the join
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return wall, latencies


def run_sequential(host, port, bodies, timeout) -> tuple[float, list[float]]:
    start = time.perf_counter()
    latencies = [post(host, port, body, timeout) for body in bodies]
    return time.perf_counter() - start, latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="generator checkpoint folder")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="guidance of every request (demo: 3)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--threads", type=int, default=2, help="the server's OMP_NUM_THREADS")
    parser.add_argument("--server-args", default="", help="extra flags for rargen serve")
    parser.add_argument(
        "--compare-speculation",
        action="store_true",
        help="run the load on a --speculate 0 server, then at default flags, and compare",
    )
    args = parser.parse_args(argv)
    if not args.compare_speculation:
        serve_and_load(args, args.server_args)
        return 0
    plain = serve_and_load(args, f"{args.server_args} --speculate 0", "plain steps (--speculate 0)")
    default = serve_and_load(args, args.server_args, "default flags (speculation where it pays)")
    print("\n| clients | mode | plain wall s | default wall s | speed-up |\n|---|---|---|---|---|")
    for (n, mode), before in plain.items():
        after = default[n, mode]
        print(f"| {n} | {mode} | {before:.2f} | {after:.2f} | {before / after:.2f}x |")
    return 0


def serve_and_load(
    args: argparse.Namespace, server_args: str, title: str = ""
) -> dict[tuple[int, str], float]:
    """Start a server with ``server_args``, run the load, print its table; wall s per (clients, mode)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
        "OMP_NUM_THREADS": str(args.threads),
    }
    command = [sys.executable, "-m", "rargen", "serve", args.checkpoint, "--tokenizer", args.tokenizer]
    command += ["--port", "0", "--rate-limit", "0", *server_args.split()]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    walls: dict[tuple[int, str], float] = {}
    try:
        line = server.stdout.readline()
        if not line.startswith("rargen serve: http://"):
            raise RuntimeError(f"the server did not start: {line!r}")
        host, port = line.split()[2].removeprefix("http://").split(":")
        port = int(port)
        info_conn = http.client.HTTPConnection(host, port, timeout=30)
        info_conn.request("GET", "/info")
        info = json.loads(info_conn.getresponse().read())
        info_conn.close()
        post(host, port, {"class": 0, "seed": 0, "cfg_scale": args.cfg_scale}, args.timeout)  # warm-up
        print(f"\n## {title or 'rargen serve'} {server_args}".rstrip())
        print(f"# rargen serve {args.checkpoint}: grid {info['grid']}, limits {info['limits']}")
        print(f"# server OMP_NUM_THREADS={args.threads}; single-image requests, cfg_scale {args.cfg_scale}")
        print(
            "| clients | mode | wall s | images/s | p50 latency s | p95 latency s "
            "| concurrent / sequential time |"
        )
        print("|---|---|---|---|---|---|---|")
        for n in (int(c) for c in args.clients.split(",")):
            bodies = [{"class": i % 10, "seed": 1000 + i, "cfg_scale": args.cfg_scale} for i in range(n)]
            concurrent = run_concurrent(host, port, bodies, args.timeout)
            sequential = run_sequential(host, port, bodies, args.timeout)
            for mode, (wall, latencies) in (("concurrent", concurrent), ("one at a time", sequential)):
                walls[n, mode] = wall
                ratio = f"{concurrent[0] / sequential[0]:.2f}x" if mode == "concurrent" else ""
                print(
                    f"| {n} | {mode} | {wall:.2f} | {n / wall:.2f} | {statistics.median(latencies):.2f} "
                    f"| {percentile(latencies, 0.95):.2f} | {ratio} |",
                    flush=True,
                )
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return walls


if __name__ == "__main__":
    raise SystemExit(main())

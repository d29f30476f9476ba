"""Choosing ``ptjax serve``'s HTTP framework: aiohttp vs Starlette on uvicorn, each
serving one trivial JSON echo endpoint (POST a small JSON body, get it back), driven by
the same client in the same run.

    nice python benchmarks/serve_framework.py --requests 3000 --concurrency 16

Each server runs in its own subprocess (one event loop, uvicorn with its defaults:
uvloop and httptools when installed, as ``pip install uvicorn[standard]`` gives);
the client is ``http.client`` on keep-alive connections in ``--concurrency`` threads of
this process, identical for both. Reported per framework: requests/s and latency
percentiles (ms). Results go to benchmarks/results/ as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from train_step import write_result  # noqa: E402

AIOHTTP = """
import sys
from aiohttp import web
async def echo(request):
    return web.json_response(await request.json())
app = web.Application()
app.router.add_post("/echo", echo)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

STARLETTE = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
async def echo(request: Request):
    return JSONResponse(await request.json())
app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False)
"""

BODY = json.dumps({"run": "runs/sentiment", "inputs": "sentence: the film was great",
                   "k": 0}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, timeout: float = 30.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no server on port {port}")


def drive(port: int, n: int, concurrency: int) -> dict:
    """n POSTs from ``concurrency`` threads, one keep-alive connection each."""
    latencies, lock = [], threading.Lock()

    def client(count):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        mine = []
        for _ in range(count):
            t0 = time.perf_counter()
            conn.request("POST", "/echo", BODY, {"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read()) == json.loads(BODY)
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)

    per = [n // concurrency + (i < n % concurrency) for i in range(concurrency)]
    threads = [threading.Thread(target=client, args=(c,)) for c in per]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1e3
    return {"requests": n, "requests_per_s": n / wall,
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per framework")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    results = {"aiohttp": [], "starlette+uvicorn": []}
    for _ in range(a.rounds):  # alternated, so a busy machine hurts both alike
        for name, code in (("aiohttp", AIOHTTP), ("starlette+uvicorn", STARLETTE)):
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-c", code, str(port)])
            try:
                wait_up(port)
                drive(port, min(200, a.requests), a.concurrency)  # warm-up
                results[name].append(drive(port, a.requests, a.concurrency))
            finally:
                proc.terminate()
                proc.wait()
    best = {name: max(rs, key=lambda r: r["requests_per_s"]) for name, rs in results.items()}
    for name, r in best.items():
        print(f"{name:18s} {r['requests_per_s']:8.0f} requests/s  p50 {r['p50_ms']:.2f} ms"
              f"  p90 {r['p90_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms")
    versions = {}
    for pkg in ("aiohttp", "starlette", "uvicorn", "uvloop", "httptools"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    result = {"benchmark": "serve_framework", "date": datetime.date.today().isoformat(),
              "machine": platform.platform(), "cpus": os.cpu_count(),
              "command": " ".join(["python", "benchmarks/serve_framework.py", *sys.argv[1:]]),
              "concurrency": a.concurrency, "versions": versions, "best_round": best,
              "rounds": results}
    write_result(result, a.out,
                 f"serve_framework-{result['date']}-cpu-c{a.concurrency}.json")


if __name__ == "__main__":
    main()

"""Admission under a burst: N requests over M seconds against `lmsys serve`.

    python -m lmsys.bench.load RUN_DIR --requests 400 --seconds 2 --max-queue 32
    python -m lmsys.bench.load --url http://127.0.0.1:8000 --requests 400 --seconds 2

With RUN_DIR the benchmark starts `lmsys serve RUN_DIR` itself (a child process on a free port,
with `--max-queue`, `--max-slots` and any `--serve-arg`), waits for its warm-up, sends the burst
and stops it; with `--url` it loads a server already running (peak RSS is then not reported).
Request i is sent at i * M / N seconds (all at once with `--seconds 0`), each a completions
request of a `--prompt-words`-word prompt for `--max-tokens` greedy tokens (EOS ignored).

Reported: how many were served (200), refused with 429 (a full queue; they come back at once
with Retry-After), other 4xx, and errors (5xx or no answer within `--timeout`); the latency
percentiles (send to last byte) of the served and of the refused; requests/s and tokens/s of
the served; and the server process's resident memory before the burst and at its peak
(VmHWM), which a bounded queue keeps flat whatever N is.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

WORDS = ["def", "return", "import", "class", "self", "value", "None", "for", "in", "if", "else", "while"]


def _memory_kb(pid: int, field: str) -> int | None:
    """VmRSS / VmHWM of a process in kB (Linux), None elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def start_server(run_dir: str, args) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "lmsys.cli", "serve", run_dir, "--port", str(port), "--no-progress",
           "--max-queue", str(args.max_queue), "--max-slots", str(args.max_slots), *args.serve_arg]
    print("server:", " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not healthy within {timeout:.0f} s")


async def burst(url: str, args, model: str) -> list[tuple[int | str, float]]:
    """(status or error name, seconds) per request, request i sent at i * seconds / requests."""
    import httpx

    rng = np.random.default_rng(0)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.requests, max_keepalive_connections=0)
    start = time.perf_counter()

    async def one(client, i):
        await asyncio.sleep(max(0.0, start + i * args.seconds / args.requests - time.perf_counter()))
        body = {"model": model, "prompt": " ".join(rng.choice(WORDS, args.prompt_words)),
                "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
        t0 = time.perf_counter()
        try:
            r = await client.post(f"{url}/v1/completions", json=body, headers=headers)
            return r.status_code, time.perf_counter() - t0
        except httpx.HTTPError as e:
            return type(e).__name__, time.perf_counter() - t0

    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        return await asyncio.gather(*[one(client, i) for i in range(args.requests)])


def _ms(xs, q) -> str:
    return f"{np.percentile(np.asarray(xs) * 1e3, q):.0f}" if xs else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", help="a run directory to serve (or give --url)")
    ap.add_argument("--url", default=None, help="a running server instead of starting one")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=2.0, help="the burst's length (0 = all at once)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--max-queue", type=int, default=32, help="the started server's --max-queue")
    ap.add_argument("--max-slots", type=int, default=8, help="the started server's --max-slots")
    ap.add_argument("--serve-arg", action="append", default=[], help="another `lmsys serve` flag; repeatable")
    ap.add_argument("--api-key", default=os.environ.get("LMSYS_API_KEY"))
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a client waits for an answer")
    args = ap.parse_args(argv)
    if (args.run_dir is None) == (args.url is None):
        ap.error("give a RUN_DIR to serve or the --url of a running server")

    import httpx

    proc, url = (None, args.url) if args.url else start_server(args.run_dir, args)
    try:
        wait_healthy(url, proc, timeout=900)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
        rss_before = _memory_kb(proc.pid, "VmRSS") if proc else None
        t0 = time.perf_counter()
        results = asyncio.run(burst(url, args, model))
        wall = time.perf_counter() - t0
        peak = _memory_kb(proc.pid, "VmHWM") if proc else None
        healthy = httpx.get(f"{url}/health", timeout=10).status_code
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    served = [s for c, s in results if c == 200]
    refused = [s for c, s in results if c == 429]
    other = sum(1 for c, _ in results if isinstance(c, int) and 400 <= c < 500 and c != 429)
    errors = sum(1 for c, _ in results if not isinstance(c, int) or c >= 500)
    print(f"\n{datetime.date.today()}, {args.requests} requests over {args.seconds:g} s "
          f"({args.prompt_words}-word prompts, {args.max_tokens} greedy tokens), --max-queue {args.max_queue}, "
          f"--max-slots {args.max_slots}; /health after: {healthy}")
    print("| served | 429 | other 4xx | errors | served p50 / p99 ms | 429 p50 / p99 ms | served req/s "
          "| tokens/s | RSS before MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    mb = (lambda kb: f"{kb / 1024:.0f}" if kb else "-")
    print(f"| {len(served)} | {len(refused)} | {other} | {errors} | {_ms(served, 50)} / {_ms(served, 99)} | "
          f"{_ms(refused, 50)} / {_ms(refused, 99)} | {len(served) / wall:.1f} | "
          f"{len(served) * args.max_tokens / wall:.0f} | {mb(rss_before)} | {mb(peak)} |")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

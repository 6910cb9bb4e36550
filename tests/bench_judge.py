"""Benchmark: judge throughput against concurrency, and the cost of asking both orders.

Runs the OpenAI judge against the scripted OpenAI-compatible test server (a fake endpoint, in its own process as a
real endpoint would be) answering every call after a fixed latency, and prints:
  - pairs judged per second (both orders each) at several concurrency limits;
  - the swap overhead: wall time for both orders over wall time for one order, same pairs, same concurrency,
    where the endpoint has room for all calls at once (target: at most 1.2, since both orders go out together).
At concurrency levels the calls saturate, both orders cost twice the calls and the ratio tends to 2: that is
throughput, not overhead, and is printed too.

    .venv/bin/python -m tests.bench_judge [--pairs 64] [--latency 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

from selfplay.config.backends import EndpointConfig
from selfplay.judging.calls import JudgeCall
from selfplay.judging.endpoint import OpenAIJudge
from tests.conftest import free_port, wait_http


@contextlib.contextmanager
def stub_server(latency: float) -> Iterator[str]:
    """The scripted server's CLI mode in a subprocess; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.openai_stub", "--port", str(port), "--latency", str(latency)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30, proc=proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def wall_time(base_url: str, calls: list[JudgeCall], concurrency: int) -> float:
    judge = OpenAIJudge(EndpointConfig(base_url=base_url, model="judge", max_concurrency=concurrency, api_key_env=None), mode="logprobs", api_key="bench")
    start = time.perf_counter()
    results = judge.judge(calls)
    elapsed = time.perf_counter() - start
    assert all(r.error is None for r in results), [r.error for r in results if r.error][:3]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the server takes per call (LLM judges: 0.3-2 s)")
    args = parser.parse_args()
    both = [JudgeCall("system", f"pair {i} order {o}") for i in range(args.pairs) for o in (1, 2)]
    one = both[::2]
    with stub_server(args.latency) as base_url:
        wall_time(base_url, one[:4], 4)  # warm up the client and server
        print(f"judge throughput: {args.pairs} pairs x 2 orders, server latency {args.latency * 1000:.0f} ms per call")
        print(f"{'concurrency':>11}  {'pairs/s':>8}  {'both orders s':>13}  {'one order s':>11}  {'both/one':>8}")
        for concurrency in (4, 8, 16, 32, 64, 2 * args.pairs):
            t_both = wall_time(base_url, both, concurrency)
            t_one = wall_time(base_url, one, concurrency)
            print(f"{concurrency:>11}  {args.pairs / t_both:>8.1f}  {t_both:>13.2f}  {t_one:>11.2f}  {t_both / t_one:>8.2f}")
        c = 2 * args.pairs
        ratios = sorted(wall_time(base_url, both, c) / wall_time(base_url, one, c) for _ in range(3))
        print(f"\nswap overhead at concurrency {c} (room for every call), median of 3: {ratios[1]:.2f}x (target <= 1.2)")


if __name__ == "__main__":
    main()

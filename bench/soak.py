"""Soak the front: Poisson arrivals above what the server sustains, streaming and plain mixed.

    python -m bench.soak [--url http://127.0.0.1:7080] [--app smollm2] [--pid-file run/front.pid]
                         [--minutes 10] [--overload 1.5] [--out bench/results/soak.json]

Against a running front (``make serve``). First it measures what the server sustains: four
clients in a closed loop for ``--calibrate-s`` seconds. Then, for ``--minutes``, requests
arrive as a Poisson process at ``--overload`` times that rate, half of them streaming, with
8 to 64 new tokens. Every request must be answered: 200, or 503 with ``Retry-After``;
anything else (an error status, a reset, a client timeout) is counted as a failure. The
RSS of the front and of the model worker is sampled every few seconds; the report gives
the first and last samples and the peak. Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from gateway.contract import JSON, LOCAL_URL, predict_route

PROMPTS = ["Tell me about the sea:", "How to prepare a spanish omelette:", "The capital of France is", "Write a haiku:"]
CALIBRATION_CLIENTS = 4
MIB = 1024 * 1024


def body(rng: random.Random) -> dict:
    stream = rng.random() < 0.5
    return {"instances": [rng.choice(PROMPTS)], "parameters": {"max_new_tokens": rng.randint(8, 64), "stream": stream}}


def send(url: str, payload: dict, timeout: float) -> tuple[int, bool, float]:
    """Status, whether a 503 carried Retry-After, seconds."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": JSON})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
            status = response.status
            retry = False
            if payload["parameters"]["stream"] and b'"predictions"' not in text.rsplit(b"\n", 1)[-1]:
                status = -1  # a stream that did not end with its final body
    except urllib.error.HTTPError as failure:
        failure.read()
        status, retry = failure.code, bool(failure.headers.get("Retry-After"))
    except (urllib.error.URLError, OSError):
        status, retry = 0, False
    return status, retry, time.monotonic() - started


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def tree_pids(supervisor: int) -> dict[str, int]:
    workers = [
        p.pid for p in psutil.Process(supervisor).children(recursive=True) if "model_service_worker" in " ".join(p.cmdline())
    ]
    return {"front": supervisor, "worker": workers[0]}


def calibrate(url: str, seconds: float, timeout: float, rng: random.Random) -> float:
    """Requests per second that four closed-loop clients get answered with 200."""
    stop = time.monotonic() + seconds
    done = Counter()

    def client(seed: int) -> None:
        local = random.Random(seed)
        while time.monotonic() < stop:
            status, _, _ = send(url, body(local), timeout)
            done[status] += 1

    threads = [threading.Thread(target=client, args=(rng.random(),)) for _ in range(CALIBRATION_CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[200] / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=LOCAL_URL)
    parser.add_argument("--app", default="smollm2")
    parser.add_argument("--pid-file", type=Path, default=Path("run/front.pid"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--overload", type=float, default=1.5)
    parser.add_argument("--calibrate-s", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=180.0, help="client timeout: past it a request counts as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    url = f"{args.url}{predict_route(args.app)}"
    rng = random.Random(args.seed)
    pids = tree_pids(int(args.pid_file.read_text()))
    sustained = calibrate(url, args.calibrate_s, args.timeout, rng)
    rate = max(sustained * args.overload, 0.05)
    samples: list[dict[str, float]] = []
    results: list[tuple[int, bool, float]] = []
    end = time.monotonic() + args.minutes * 60
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            samples.append({name: round(rss(pid) / MIB, 1) for name, pid in pids.items()})
            stop_sampling.wait(5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    sent = 0
    with ThreadPoolExecutor(max_workers=512) as pool:
        futures = []
        while time.monotonic() < end:
            futures.append(pool.submit(send, url, body(rng), args.timeout))
            sent += 1
            time.sleep(rng.expovariate(rate))
        for future in futures:
            results.append(future.result())
    stop_sampling.set()
    sampler.join()
    statuses = Counter(status for status, _, _ in results)
    bad = [r for r in results if not (r[0] == 200 or (r[0] == 503 and r[1]))]
    latencies = sorted(seconds for status, _, seconds in results if status == 200)
    report = {
        "minutes": args.minutes,
        "sustained_rps": round(sustained, 3),
        "offered_rps": round(rate, 3),
        "sent": sent,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "not_answered_as_promised": len(bad),
        "p50_s": round(latencies[len(latencies) // 2], 2) if latencies else None,
        "p95_s": round(latencies[int(len(latencies) * 0.95)], 2) if latencies else None,
        "rss_mib_first": samples[0],
        "rss_mib_last": samples[-1],
        "rss_mib_peak": {name: max(s[name] for s in samples) for name in pids},
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())

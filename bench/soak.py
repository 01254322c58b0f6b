"""Soak the front: mixed protocols above what the server sustains, worker kills, clients that leave.

    python -m bench.soak [--url http://127.0.0.1:7080] [--app smollm2] [--pid-file run/front.pid]
                         [--minutes 30] [--overload 1.5] [--kill-every-min 5] [--out bench/results/soak.json]

Against a running front (``make serve``). First it measures what the server sustains: four
clients in a closed loop sending the same mix for ``--calibrate-s`` seconds. Then, for
``--minutes``, requests arrive as a Poisson process at ``--overload`` times that rate, drawn
from `KINDS`: the native and OpenAI chat shapes, plain and streamed, structured output (a
JSON schema), and streams whose client goes away after the first piece. Every
``--kill-every-min`` minutes (from minute 5.5 by default) the model worker is SIGKILLed.

Every request must be answered as the front promises: 200; 503 with ``Retry-After``; or, for
a stream that had begun when the worker died, its protocol's error event as the last piece
("cut"). Anything else (an error status, a reset, a client timeout, a stream that stops
without its end) is a failure. Once a minute it samples the RSS, open file descriptors and
threads of the front, the model worker (whichever is alive) and TorchServe's Java process.
Issue 28's flatness: every series' samples in the last ten minutes lie within 3% of its
minute-10 value. The report (JSON) has every sample and count, and a plot of the samples
(PNG, beside the JSON). Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import psutil

from gateway.contract import CHAT_COMPLETIONS_ROUTE, JSON, LOCAL_URL, predict_route

PROMPTS = ["Tell me about the sea:", "How to prepare a spanish omelette:", "The capital of France is", "Write a haiku:"]
CALIBRATION_CLIENTS = 4
MIB = 1024 * 1024
FLAT_WITHIN = 0.03
FLAT_FROM_MINUTE = 10
KILL_OFFSET_MIN = 0.5
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def native(rng: random.Random, stream: bool) -> tuple[str, dict]:
    parameters = {"max_new_tokens": rng.randint(8, 64), "stream": stream}
    return "native", {"instances": [rng.choice(PROMPTS)], "parameters": parameters}


def chat(rng: random.Random, stream: bool, structured: bool = False) -> tuple[str, dict]:
    body: dict = {
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": rng.randint(8, 64),
        "stream": stream,
    }
    if structured:
        body["messages"] = [{"role": "user", "content": "Give me a person as JSON."}]
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    return "openai", body


# kind -> (weight, body maker, whether its client leaves after the first piece)
KINDS: dict[str, tuple[float, Callable[[random.Random], tuple[str, dict]], bool]] = {
    "native": (2, lambda rng: native(rng, False), False),
    "native-stream": (2, lambda rng: native(rng, True), False),
    "chat": (2, lambda rng: chat(rng, False), False),
    "chat-stream": (2, lambda rng: chat(rng, True), False),
    "structured": (1, lambda rng: chat(rng, False, structured=True), False),
    "leaver": (1, lambda rng: chat(rng, True) if rng.random() < 0.5 else native(rng, True), True),
}


def draw(rng: random.Random, leavers: bool = True) -> str:
    kinds = [kind for kind, (_, _, leaves) in KINDS.items() if leavers or not leaves]
    return rng.choices(kinds, weights=[KINDS[kind][0] for kind in kinds])[0]


def stream_outcome(shape: str, text: bytes) -> str:
    """How a 200 stream ended: "ok" with its protocol's end, "cut" with its error event, else "broken"."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else b""
    if shape == "openai":  # the front's error event is followed by [DONE]
        if any(line.startswith(b"data:") and line.startswith(b'data: {"error"') for line in lines):
            return "cut"
        return "ok" if last == b"data: [DONE]" else "broken"
    if b'"predictions"' in last:
        return "ok"
    return "cut" if b'"error"' in last else "broken"


def send(base: str, app: str, kind: str, rng: random.Random, timeout: float) -> dict:
    """One request of `kind`: its outcome ("200", "200-cut", "503", "left", another status, "0" for
    no answer, "200-broken"), whether a 503 carried Retry-After, and its seconds."""
    shape, body = KINDS[kind][1](rng)
    leaves = KINDS[kind][2]
    path = predict_route(app) if shape == "native" else CHAT_COMPLETIONS_ROUTE
    if shape == "openai":
        body["model"] = app
    split = urlsplit(base)
    connection = http.client.HTTPConnection(split.hostname, split.port, timeout=timeout)
    started = time.monotonic()
    retry = False
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": JSON})
        response = connection.getresponse()
        if response.status != 200:
            response.read()
            outcome, retry = str(response.status), bool(response.getheader("Retry-After"))
        elif leaves:
            response.read1(1)  # the first piece has come: this client goes away
            outcome = "left"
        else:
            text = response.read()
            outcome = (
                "200"
                if not body.get("stream")
                else {"ok": "200", "cut": "200-cut"}.get(stream_outcome(shape, text), "200-broken")
            )
    except (OSError, http.client.HTTPException):
        outcome = "0"
    finally:
        connection.close()
    return {"kind": kind, "outcome": outcome, "retry_after": retry, "seconds": round(time.monotonic() - started, 2)}


def promised(result: dict) -> bool:
    outcome = result["outcome"]
    return outcome in ("200", "200-cut", "left") or (outcome == "503" and result["retry_after"])


def processes(front: int) -> dict[str, psutil.Process]:
    """The front, TorchServe's Java process and the live model worker, found anew at each call."""
    found = {"front": psutil.Process(front)}
    for child in found["front"].children(recursive=True):
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "model_service_worker" in line and child.is_running():
            found.setdefault("worker", child)
        elif child.name() == "java" or "org.pytorch.serve" in line:
            found.setdefault("java", child)
    return found


def sample(front: int, minute: float) -> dict:
    record: dict = {"minute": round(minute, 2)}
    for name, process in processes(front).items():
        try:
            with process.oneshot():
                record[name] = {
                    "rss_mib": round(process.memory_info().rss / MIB, 1),
                    "fds": process.num_fds(),
                    "threads": process.num_threads(),
                    "pid": process.pid,
                }
        except psutil.Error:
            continue
    return record


def flatness(samples: list[dict]) -> dict:
    """Per process and measure: the minute-10 value, the last ten minutes' range, and whether it lies within 3%."""
    verdicts: dict = {}
    last = samples[-1]["minute"]
    reference = min(samples, key=lambda s: abs(s["minute"] - FLAT_FROM_MINUTE))
    tail = [s for s in samples if s["minute"] >= last - 10]
    for name in ("front", "worker", "java"):
        for measure in ("rss_mib", "fds", "threads"):
            if name not in reference or not tail:
                continue
            base = reference[name][measure]
            values = [s[name][measure] for s in tail if name in s]
            low, high = min(values), max(values)
            within = base * FLAT_WITHIN
            verdicts[f"{name}.{measure}"] = {
                "minute_10": base,
                "last_10_min": [low, high],
                "flat": abs(low - base) <= within and abs(high - base) <= within,
            }
    return verdicts


def plot(samples: list[dict], kills: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for axis, (measure, label) in zip(axes, (("rss_mib", "RSS (MiB)"), ("fds", "open file descriptors"), ("threads", "threads"))):
        for name in ("front", "worker", "java"):
            points = [(s["minute"], s[name][measure]) for s in samples if name in s]
            if points:
                axis.plot(*zip(*points), marker=".", label=name)
        for minute in kills:
            axis.axvline(minute, color="grey", linestyle="--", linewidth=0.8)
        axis.set_ylabel(label)
        axis.set_yscale("log" if measure == "rss_mib" else "linear")
        axis.grid(alpha=0.3)
    axes[0].legend(loc="upper left")
    axes[0].set_title("bench.soak: per-minute samples (dashed: worker SIGKILLed)")
    axes[-1].set_xlabel("minute")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def calibrate(base: str, app: str, seconds: float, timeout: float, seed: int) -> float:
    """Requests per second that four closed-loop clients get answered with 200, with the soak's mix (no leavers)."""
    stop = time.monotonic() + seconds
    done: Counter = Counter()

    def client(seed: float) -> None:
        local = random.Random(seed)
        while time.monotonic() < stop:
            done[send(base, app, draw(local, leavers=False), local, timeout)["outcome"]] += 1

    rng = random.Random(seed)
    threads = [threading.Thread(target=client, args=(rng.random(),)) for _ in range(CALIBRATION_CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done["200"] / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=LOCAL_URL)
    parser.add_argument("--app", default="smollm2")
    parser.add_argument("--pid-file", type=Path, default=Path("run/front.pid"))
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--overload", type=float, default=1.5)
    parser.add_argument("--kill-every-min", type=float, default=5.0, help="0: no kills")
    parser.add_argument("--sample-s", type=float, default=60.0)
    parser.add_argument("--calibrate-s", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="client timeout: past it a request counts as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args()
    front = int(args.pid_file.read_text())
    sustained = calibrate(args.url, args.app, args.calibrate_s, args.timeout, args.seed)
    rate = max(sustained * args.overload, 0.05)
    rng = random.Random(args.seed)
    started = time.monotonic()
    end = started + args.minutes * 60
    stop = threading.Event()
    samples: list[dict] = []
    kills: list[float] = []

    def minutes() -> float:
        return (time.monotonic() - started) / 60

    def sampler() -> None:
        while not stop.is_set():
            samples.append(sample(front, minutes()))
            stop.wait(args.sample_s)
        samples.append(sample(front, minutes()))

    def killer() -> None:
        # Half a minute off the sampling minutes, so that no sample catches a worker just killed or loading.
        wait_s = (args.kill_every_min + KILL_OFFSET_MIN) * 60
        while args.kill_every_min > 0 and not stop.wait(wait_s):
            wait_s = args.kill_every_min * 60
            worker = processes(front).get("worker")
            if worker is not None:
                os.kill(worker.pid, signal.SIGKILL)
                kills.append(round(minutes(), 2))

    background = [threading.Thread(target=sampler), threading.Thread(target=killer)]
    for thread in background:
        thread.start()
    with ThreadPoolExecutor(max_workers=512) as pool:
        futures = []
        while time.monotonic() < end:
            futures.append(pool.submit(send, args.url, args.app, draw(rng), random.Random(rng.random()), args.timeout))
            time.sleep(rng.expovariate(rate))
        stop.set()
        results = [future.result() for future in futures]
    for thread in background:
        thread.join()
    outcomes = Counter(f"{r['kind']} {r['outcome']}" for r in results)
    latencies = sorted(r["seconds"] for r in results if r["outcome"] == "200")
    verdicts = flatness(samples)
    report = {
        "minutes": args.minutes,
        "sustained_rps": round(sustained, 3),
        "offered_rps": round(rate, 3),
        "sent": len(results),
        "outcomes": dict(sorted(outcomes.items())),
        "not_answered_as_promised": sum(not promised(r) for r in results),
        "p50_s": latencies[len(latencies) // 2] if latencies else None,
        "p95_s": latencies[int(len(latencies) * 0.95)] if latencies else None,
        "kills_at_minute": kills,
        "flat": all(v["flat"] for v in verdicts.values()),
        "flatness": verdicts,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(samples, kills, args.out.with_suffix(".png"))
    summary = {key: value for key, value in report.items() if key != "samples"}
    sys.stdout.write(json.dumps(summary, indent=1) + "\n")
    return 0 if report["not_answered_as_promised"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Wait until a model really answers, not merely until TorchServe's /ping says Healthy.

    python scripts/wait_ready.py APP [--inference URL] [--management URL] [--timeout S] [--pid PID]

TorchServe's /ping answers 200 while the worker is still loading. Ready means: the
management API lists a READY worker for APP, and a one-token prediction returns 200.
Exits non-zero on timeout, or at once if the server process (--pid) has died.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

PROBE = json.dumps({"instances": ["Hello"], "parameters": {"max_new_tokens": 1, "temperature": 0}}).encode()


def worker_ready(management: str, app: str) -> bool:
    try:
        with urllib.request.urlopen(f"{management}/models/{app}", timeout=5) as response:
            models = json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return any(worker.get("status") == "READY" for model in models for worker in model.get("workers", []))


def answers(inference: str, app: str) -> bool:
    request = urllib.request.Request(
        f"{inference}/predictions/{app}", data=PROBE, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait(app: str, inference: str, management: str, timeout: float, pid: int | None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            sys.stderr.write("the server process exited before the model was ready\n")
            return False
        if worker_ready(management, app) and answers(inference, app):
            return True
        time.sleep(1)
    sys.stderr.write(f"{app} did not answer within {timeout:.0f} s\n")
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("app")
    parser.add_argument("--inference", default="http://127.0.0.1:7080")
    parser.add_argument("--management", default="http://127.0.0.1:7081")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--pid", type=int)
    args = parser.parse_args()
    sys.exit(0 if wait(args.app, args.inference, args.management, args.timeout, args.pid) else 1)


if __name__ == "__main__":
    main()

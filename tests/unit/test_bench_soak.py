"""The soak's judgements: how a stream ended, which answers keep the front's promise, and flatness."""

from __future__ import annotations

import json
import random

from bench.soak import KINDS, draw, flatness, promised, stream_outcome
from gateway.openai_api import broken_stream
from gateway.relay import NATIVE, WORKER_DIED


def test_an_openai_stream_is_whole_only_with_done_and_no_error_event():
    whole = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: [DONE]\n\n'
    assert stream_outcome("openai", whole) == "ok"
    assert stream_outcome("openai", whole[:-16]) == "broken"
    cut = b'data: {"choices": [{"delta": {"content": "Hi"}}]}' + broken_stream(WORKER_DIED, 507)
    assert stream_outcome("openai", cut) == "cut"


def test_a_native_stream_ends_with_its_predictions_or_the_fronts_error_line():
    assert stream_outcome("native", b'{"token": "a"}\n{"predictions": [{"generated_text": "a"}]}\n') == "ok"
    assert stream_outcome("native", b'{"token": "a"}\n' + NATIVE.broken_stream(WORKER_DIED, 507)) == "cut"
    assert stream_outcome("native", b'{"token": "a"}\n') == "broken"
    assert json.loads(NATIVE.broken_stream(WORKER_DIED, 507))["code"] == 507


def test_only_the_promised_answers_pass():
    def result(outcome: str, retry: bool = False) -> dict:
        return {"outcome": outcome, "retry_after": retry}

    assert all(promised(result(outcome)) for outcome in ("200", "200-cut", "left"))
    assert promised(result("503", retry=True))
    assert not any(promised(result(outcome)) for outcome in ("503", "507", "0", "200-broken"))


def test_calibration_draws_no_leavers_and_the_soak_draws_every_kind():
    rng = random.Random(0)
    assert "leaver" not in {draw(rng, leavers=False) for _ in range(500)}
    assert {draw(rng) for _ in range(500)} == set(KINDS)


def samples(front_rss: list[float]) -> list[dict]:
    return [{"minute": minute, "front": {"rss_mib": rss, "fds": 20, "threads": 8}} for minute, rss in enumerate(front_rss)]


def test_flat_means_the_last_ten_minutes_within_three_percent_of_minute_ten():
    steady = samples([30.0] * 10 + [40.0] * 11 + [40.5] * 10)
    verdicts = flatness(steady)
    assert verdicts["front.rss_mib"] == {"minute_10": 40.0, "last_10_min": [40.0, 40.5], "flat": True}
    assert verdicts["front.fds"]["flat"] and verdicts["front.threads"]["flat"]
    growing = samples([40.0] * 21 + [40.0 + minute for minute in range(10)])
    assert not flatness(growing)["front.rss_mib"]["flat"]

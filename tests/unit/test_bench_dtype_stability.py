"""The dtype-stability report states its verdict from the starts' choices, and names the CPU and load."""

from __future__ import annotations

from bench.dtype_stability import markdown

ENVIRONMENT = {"cpu": "Test CPU (avx2)", "load_average": [1.5, 1.0, 0.5]}


def start(chosen: str, burned: bool) -> dict:
    return {"beside_cpu_burner": burned, "chosen": chosen, "step_ms": {"float32": 100.0, chosen: 50.0}}


def test_the_same_choice_at_every_start_is_the_verdict():
    results = {"environment": ENVIRONMENT, "rows": 16, "starts": [start("bfloat16", False), start("bfloat16", True)]}
    results["same_choice"] = True
    text = markdown(results)
    assert "Verdict: the same format at every start." in text
    assert "Test CPU (avx2)" in text and "1.50" in text
    assert "| 2 | yes | 50.00 | 100.00 | bfloat16 |" in text


def test_a_flipped_choice_is_reported_as_such():
    results = {"environment": ENVIRONMENT, "rows": 16, "starts": [start("bfloat16", False), start("float32", True)]}
    results["same_choice"] = False
    text = markdown(results)
    assert "load flipped the choice" in text
    assert "| 2 | yes | – | 50.00 | float32 |" in text

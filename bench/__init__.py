"""Benchmarks: `python -m bench` (serving, several targets) and `python -m bench.single_stream`
(one stream, dtype and quantization)."""

"""Serve any Hugging Face causal LM through TorchServe.

Modules, one job each: `settings` (the app's typed config), `params` (generation
parameters), `requests` (request shapes and validation), `errors` (client errors
as data), `stopping` (stop strings, finish reasons, stream hold-back), `sampling`
(per-row logits processing), `engine` (load and generate), `sources` (where
weights come from), `metrics`, and `torchserve_handler` (the thin adapter).
"""

"""One sequence's decoding, the same on both schedulers: logits processors, sampling, stopping, detokenization."""

"""Structured output: a response format compiled once, in a killable child, and applied per row as a logits mask."""

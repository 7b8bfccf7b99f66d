"""Evaluation: batched KV-cache generation (refusal detection and suites build on it)."""

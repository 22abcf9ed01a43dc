"""Evaluation harness: benchmark formats and converters, batched resumable runs, metrics, comparisons."""

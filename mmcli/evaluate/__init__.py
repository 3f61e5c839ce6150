"""Evaluation: retrieval metrics, zero-shot classification, linear probe, summaries."""

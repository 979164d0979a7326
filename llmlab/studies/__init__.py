"""Experiment drivers: each runs several llmlab trainings and reports a table."""

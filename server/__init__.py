"""Flower ServerApp of fedcompare: one arm of a comparison, its strategies, round loop and checkpoint hooks."""

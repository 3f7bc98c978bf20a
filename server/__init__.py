"""Flower ServerApp of fedcompare: one arm of a comparison, FedAvg rounds and checkpoint hooks."""

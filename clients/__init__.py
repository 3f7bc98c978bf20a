"""Flower ClientApp of fedcompare, its data loading, model zoo and local training."""

"""Differential privacy for fedcompare (Opacus DP-SGD, client-level DP, accounting)."""

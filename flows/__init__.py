"""Prefect flows and tasks of fedcompare: the `federated-compare` flow and its report."""

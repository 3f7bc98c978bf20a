"""Centralized reference: the same model trained on the pooled data of some nodes."""

from __future__ import annotations

from typing import Any

from clients.data import Dataset, central_test, pooled_train
from clients.models import build_model


def train_centralized(
    dataset: Dataset,
    *,
    model_name: str,
    partition_ids: tuple[int, ...],
    num_partitions: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    data_kwargs: dict[str, Any],
) -> dict[str, float]:
    """Train `model_name` on the union of the nodes' local train splits; evaluate on the central test set."""
    train = pooled_train(dataset, num_partitions=num_partitions, partition_ids=partition_ids, **data_kwargs)
    test = central_test(
        dataset, central_test_fraction=data_kwargs["central_test_fraction"], seed=data_kwargs["seed"]
    )
    model = build_model(
        model_name, input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=seed, device="auto"
    )
    fit = model.fit(train, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    metrics = model.evaluate(test, batch_size=max(batch_size, 256))
    return {
        "accuracy": float(metrics["accuracy"]),
        "macro_f1": float(metrics["macro_f1"]),
        "loss": float(metrics["loss"]),
        "train_seconds": float(fit["train_seconds"]),
        "num_examples": int(len(train)),
        "epochs": int(epochs),
    }

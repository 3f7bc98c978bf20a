"""Centralized reference: the same model trained on the pooled data of some nodes."""

from __future__ import annotations

from typing import Any

import numpy as np

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
    optimizer: str = "adam",
    weight_decay: float | None = None,
    data_kwargs: dict[str, Any],
    dp: dict[str, Any] | None = None,
    teacher: tuple[str, dict[str, np.ndarray]] | None = None,
    distill: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Train `model_name` on the union of the nodes' local train splits; evaluate on the central test set.

    ``dp`` (target_epsilon, delta, max_grad_norm, accountant) trains with DP-SGD instead,
    calibrated so that all ``epochs`` together meet target_epsilon on the pooled data;
    the result then carries the privacy plan. ``teacher`` (zoo model name, arrays) distils
    the model from that model's soft labels on the pooled data, with ``distill``'s
    temperature and alpha (clients/distill.py).
    """
    train = pooled_train(dataset, num_partitions=num_partitions, partition_ids=partition_ids, **data_kwargs)
    test = central_test(
        dataset, central_test_fraction=data_kwargs["central_test_fraction"], seed=data_kwargs["seed"]
    )
    model = build_model(
        model_name, input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=seed, device="auto",
        private=dp is not None,
    )
    wrap, plan = None, None
    if dp is not None:
        from privacy.accounting import plan_sample_level
        from privacy.sample_level import dp_sgd

        plan = plan_sample_level(num_examples=len(train), batch_size=batch_size, local_epochs=epochs, rounds=1,
                                 who="the pooled reference data", **dp)
        wrap = dp_sgd(plan)
    if teacher is not None:
        from clients.distill import fit_distilled, soft_labels

        taught = build_model(teacher[0], input_shape=dataset.input_shape, num_classes=dataset.num_classes, seed=seed,
                             device="auto")
        taught.set_arrays(teacher[1])
        settings = distill or {}
        temperature, alpha = float(settings.get("temperature", 2.0)), float(settings.get("alpha", 0.5))
        fit = fit_distilled(model, train, soft_labels(taught, train.x, temperature), temperature=temperature,
                            alpha=alpha, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                            optimizer=optimizer, weight_decay=weight_decay)
    else:
        fit = model.fit(train, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                        optimizer=optimizer, weight_decay=weight_decay, **({"wrap": wrap} if wrap else {}))
    metrics = model.evaluate(test, batch_size=max(batch_size, 256))
    return {
        **({"privacy": {**plan.as_dict(), "epsilon": plan.epsilon_after(1)}} if plan else {}),
        "accuracy": float(metrics["accuracy"]),
        "macro_f1": float(metrics["macro_f1"]),
        "loss": float(metrics["loss"]),
        "train_seconds": float(fit["train_seconds"]),
        "num_examples": int(len(train)),
        "epochs": int(epochs),
    }

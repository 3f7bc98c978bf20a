"""What the checkpoint tests share besides their fixtures (those live in tests/conftest.py).

An arm config and a model description, model-like arrays and their comparison, writing
scored rounds, a round's model key, and a flipped byte (bit rot injected on purpose).
"""

from __future__ import annotations

import numpy as np

from infra.checkpoints import round_prefix, write_round
from infra.store import Store

CONFIG = {"model": "cnn", "rounds": 2, "lr": 0.01, "dp": {"noise_multiplier": 1.1}}

META = {"model": {"name": "cnn", "args": {"input_shape": [1, 28, 28], "num_classes": 10}},
        "privacy": {"accountant": "rdp", "history": [[1.1, 0.01, 30]], "epsilon": 2.5}}


def model_arrays(seed: int) -> dict[str, np.ndarray]:
    """Return model-like arrays in a deliberately non-alphabetical order with mixed dtypes."""
    rng = np.random.default_rng(seed)
    return {
        "conv1.weight": rng.standard_normal((4, 3, 3)).astype(np.float32),
        "conv1.bias": rng.standard_normal(4),
        "bn.num_batches_tracked": np.array(seed, dtype=np.int64),
        "file": np.arange(5, dtype=np.uint8),  # a name that np.savez(file, **kw) would choke on
        "a.mask": np.array([True, False]),
    }


def assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Assert equal names, order, dtypes, shapes and values."""
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(got[name], want[name])


def flip_byte(store: Store, key: str) -> None:
    """Flip one byte in the middle of a stored object (a bit-rot fault injected on purpose)."""
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    store.put_bytes(key, bytes(data))


def write_rounds(store: Store, run: str, arm: str, scores: list[float], *, keep_last: int = 0) -> dict:
    """Write rounds 1..len(scores) with models model_arrays(r) and the given scores; return the last manifest."""
    manifest = {}
    for r, score in enumerate(scores, start=1):
        manifest = write_round(store, run, arm, r, model_arrays(r), {"accuracy": score}, CONFIG,
                               meta=META, score=score, keep_last=keep_last)
    return manifest


def model_key(run: str, arm: str, r: int) -> str:
    """Return the key of a round's model."""
    return f"{round_prefix(run, arm, r)}/model.npz"

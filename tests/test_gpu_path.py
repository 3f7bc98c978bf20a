"""Tests of the GPU path: precision policy, unchanged CPU numerics, CUDA mixed precision, the memory estimate."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from clients import _torch_models
from clients._memory import training_memory_breakdown
from clients.data import Dataset, load_dataset, split_central
from clients.models import build_model, estimate_training_memory_bytes

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: mixed precision runs only on CUDA")
MNIST = dict(input_shape=(1, 28, 28), num_classes=10)


@pytest.fixture(scope="module")
def mnist() -> tuple[Dataset, Dataset]:
    """Return 400 stratified MNIST training images and 300 test images."""
    rest, test = split_central(load_dataset("mnist"), test_fraction=0.06, seed=0)
    _, train = split_central(rest, test_fraction=0.085, seed=0)
    return train, test


def reference_fit(network: torch.nn.Module, train: Dataset, *, optimizer: str, learning_rate: float, seed: int) -> None:
    """Train one epoch in plain float32 the way TorchModel.fit did before mixed precision existed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        step = (torch.optim.Adam(network.parameters(), lr=learning_rate) if optimizer == "adam"
                else torch.optim.SGD(network.parameters(), lr=learning_rate, momentum=0.9))
        loader = DataLoader(TensorDataset(torch.from_numpy(train.x), torch.from_numpy(train.y)), batch_size=32,
                            shuffle=True, generator=torch.Generator().manual_seed(seed))
        network.train()
        for x, y in loader:
            step.zero_grad(set_to_none=True)
            F.cross_entropy(network(x), y).backward()
            step.step()


# ------------------------------------------------------------------ precision policy (CPU)


def test_cpu_and_dp_train_in_float32_without_autocast() -> None:
    assert _torch_models.training_precision("cpu", private=False) == "fp32"
    assert _torch_models.training_precision("cpu", private=True) == "fp32"
    assert _torch_models.training_precision("cuda", private=True) == "fp32"  # DP-SGD: no GPU query needed
    assert isinstance(_torch_models.autocast("cpu", "bf16"), type(_torch_models.autocast("cpu", "fp32")))
    assert not isinstance(_torch_models.autocast("cpu", "bf16"), torch.autocast)


@pytest.mark.parametrize(("name", "optimizer", "learning_rate"), [("cnn", "adam", 1e-3), ("mlp", "sgd", 0.05)])
def test_cpu_fit_is_bit_identical_to_a_plain_float32_loop(
    name: str, optimizer: str, learning_rate: float, mnist: tuple[Dataset, Dataset]
) -> None:
    """Resumed arms replay rounds to the same bytes on CPU nodes: the precision work must not move them."""
    train = mnist[0]
    ours = build_model(name, **MNIST, seed=3, device="cpu")
    reference = build_model(name, **MNIST, seed=3, device="cpu")

    ours.fit(train, epochs=1, batch_size=32, learning_rate=learning_rate, seed=7, optimizer=optimizer)
    reference_fit(reference.network, train, optimizer=optimizer, learning_rate=learning_rate, seed=7)

    untrained = build_model(name, **MNIST, seed=3, device="cpu").get_arrays()
    got, expected = ours.get_arrays(), reference.get_arrays()
    assert ours.precision == "fp32"
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert not all(np.array_equal(got[k], untrained[k]) for k in untrained)  # it did train


def test_cuda_numerics_set_and_restore_tf32_and_benchmark_and_leave_the_cpu_alone() -> None:
    matmul, conv, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn
    before = matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark

    with _torch_models.cuda_numerics("cpu", "fp32"):
        assert (matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark) == before
    with _torch_models.cuda_numerics("cuda", "fp32"):  # the flags are settable without a GPU
        assert (matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark) == ("ieee", "ieee", False)
    with _torch_models.cuda_numerics("cuda:0", "bf16"):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")

    assert (matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark) == before


# ------------------------------------------------------------------ CUDA


def _conv_output_dtypes(model) -> tuple[list[torch.dtype], torch.utils.hooks.RemovableHandle]:
    """Record the dtype of conv1's output during training."""
    dtypes: list[torch.dtype] = []
    handle = model.network.conv1.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    return dtypes, handle


@NEEDS_CUDA
@pytest.mark.parametrize("force_fp16", [False, True])
def test_cuda_fit_runs_under_autocast_and_lowers_the_loss(
    force_fp16: bool, mnist: tuple[Dataset, Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    if force_fp16:  # a GPU without native bfloat16 (before Ampere) takes float16 with a GradScaler
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    expected = "fp16" if force_fp16 or not torch.cuda.is_bf16_supported(including_emulation=False) else "bf16"
    train, test = mnist
    model = build_model("cnn", **MNIST, seed=0, device="cuda")
    dtypes, handle = _conv_output_dtypes(model)
    before = model.evaluate(test, batch_size=128)["loss"]

    first = model.fit(train, epochs=2, batch_size=32, learning_rate=1e-3, seed=0)
    second = model.fit(train, epochs=2, batch_size=32, learning_rate=1e-3, seed=1)
    handle.remove()

    assert model.device.startswith("cuda") and model.precision == expected
    assert set(dtypes) == {torch.float16 if expected == "fp16" else torch.bfloat16}
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in model.get_arrays().values())
    assert second["train_loss"] < first["train_loss"]
    assert model.evaluate(test, batch_size=128)["loss"] < before


@NEEDS_CUDA
def test_cuda_dp_sgd_trains_in_strict_float32(mnist: tuple[Dataset, Dataset]) -> None:
    from privacy.accounting import plan_sample_level
    from privacy.sample_level import dp_sgd

    train = mnist[0]
    model = build_model("cnn", **MNIST, seed=0, device="cuda", private=True)
    plan = plan_sample_level(num_examples=len(train), batch_size=32, local_epochs=1, rounds=1, target_epsilon=8.0,
                             delta=1e-5, max_grad_norm=1.0, accountant="rdp", who="test")
    dtypes, handle = _conv_output_dtypes(model)
    matmul_seen: list[str] = []
    model.network.fc1.register_forward_pre_hook(
        lambda m, args: matmul_seen.append(torch.backends.cuda.matmul.fp32_precision))

    model.fit(train, epochs=1, batch_size=32, learning_rate=0.05, seed=0, optimizer="sgd", wrap=dp_sgd(plan))
    handle.remove()

    assert model.precision == "fp32" and set(dtypes) == {torch.float32} and set(matmul_seen) == {"ieee"}


# ------------------------------------------------------------------ memory estimate


def test_saved_activations_of_the_mlp_match_a_count_by_hand() -> None:
    """The MLP saves its input, both ReLU outputs, the log-softmax and the int64 targets per example."""
    batch = 64
    parts = training_memory_breakdown("mlp", **MNIST, batch_size=batch, private=False)

    per_example = 4 * (784 + 512 + 256 + 10) + 8
    assert parts["activations"] == pytest.approx(batch * per_example, abs=16)  # NLL's scalar total weight on top
    n_params = 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10
    assert parts["parameters"] == parts["gradients"] == 4 * n_params and parts["optimizer"] == 8 * n_params


def test_estimate_grows_with_the_batch_and_with_dp() -> None:
    def estimate(**kwargs) -> int:
        return estimate_training_memory_bytes("cnn", **MNIST, **{"batch_size": 32, "private": False, **kwargs})

    assert estimate(batch_size=1) < estimate(batch_size=32) < estimate(batch_size=256)
    assert estimate(optimizer="sgd") < estimate()
    assert estimate() < estimate(private=True) < estimate(private=True, grad_sample_mode="hooks")
    hooks_growth = estimate(private=True, grad_sample_mode="hooks", batch_size=64) - estimate(
        private=True, grad_sample_mode="hooks")
    assert hooks_growth > 32 * 4 * 1_000_000  # 32 more examples, each with a gradient of every parameter


def test_estimate_defaults_to_the_grad_sample_mode_nodes_use_and_rejects_non_torch_models() -> None:
    from privacy.sample_level import DEFAULT_GRAD_SAMPLE_MODE

    default = inspect.signature(estimate_training_memory_bytes).parameters["grad_sample_mode"].default
    assert default == DEFAULT_GRAD_SAMPLE_MODE
    with pytest.raises(ValueError, match="expected a torch model.*runs on the CPU only"):
        estimate_training_memory_bytes("logreg", **MNIST, batch_size=32, private=False)


def cpu_tensor_peak_bytes(train_step) -> int:
    """Return the peak of bytes the CPU allocator holds during ``train_step()`` above what it held before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        train_step()
    events = sorted((e for e in profiled.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:  # allocations count positive, frees negative
        held += event.nbytes()
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize(("mode", "optimizer", "batch"), [("plain", "adam", 128), ("ghost", "sgd", 128),
                                                           ("hooks", "sgd", 32)])
def test_estimate_is_within_a_factor_of_two_of_the_measured_cpu_tensor_peak(mode: str, optimizer: str,
                                                                            batch: int) -> None:
    """The first step of a fresh network (parameters already held) allocates what the estimate adds to them."""
    private = mode != "plain"
    network = build_model("cnn", **MNIST, seed=0, device="cpu", private=private).network
    step = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(network.parameters(), lr=1e-3)
    criterion = F.cross_entropy
    if private:
        from privacy.accounting import Plan
        from privacy.sample_level import dp_sgd

        plan = Plan("sample-level", "rdp", 8.0, 1e-5, 1.0, 0.1, 1, 1, 1.0, False)
        loader = DataLoader(TensorDataset(torch.zeros(10 * batch, *MNIST["input_shape"]),
                                          torch.zeros(10 * batch, dtype=torch.int64)), batch_size=batch)
        network, step, _, criterion = dp_sgd(plan, grad_sample_mode=mode)(network, step, loader)
    network.train()

    def train_step() -> None:
        """Take one step on a fresh random batch."""
        x, y = torch.randn(batch, *MNIST["input_shape"]), torch.randint(0, 10, (batch,))
        step.zero_grad(set_to_none=True)
        criterion(network(x), y).backward()
        step.step()

    measured = cpu_tensor_peak_bytes(train_step)
    parts = training_memory_breakdown("cnn", **MNIST, batch_size=batch, private=private, optimizer=optimizer,
                                      grad_sample_mode=mode if private else "ghost")
    estimated = sum(parts.values()) - parts["parameters"]

    assert 0.5 <= estimated / measured <= 2.0, (estimated, measured, parts)

"""Torch networks of the zoo (cnn, mlp, torch-logreg) and their train/evaluate loops.

Private to ``clients``: build models through ``clients.models.build_model``.
No BatchNorm anywhere, so Opacus DP-SGD can wrap every network. Training is
deterministic on the CPU for a seed without touching torch's global RNG state
(``torch.random.fork_rng``).

Precision (``training_precision``): the CPU trains in float32, unchanged, so a resumed
arm replays a round to the same bytes. CUDA trains under autocast — bfloat16 where the
GPU has it natively (compute capability 8.0+), else float16 with a GradScaler — with
float32 weights, gradients and optimizer state, TF32 allowed, ``cudnn.benchmark`` off
(batch shapes vary and every round is a fresh process that would autotune again).
DP-SGD (any ``wrap``) trains in strict float32 (no TF32) on CUDA too: under autocast
Opacus 1.6 would compute the per-sample norms it clips in bfloat16 (3 significant
digits), so a clipped gradient could exceed the ``max_grad_norm`` the accountant takes
as exact, and a GradScaler's loss scale would multiply the gradients Opacus clips.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from math import prod

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.data import Dataset
from clients._model_checks import check_arrays, check_data, check_fit_args, classification_metrics

# (module, optimizer, loader) -> (module, optimizer, loader, criterion), e.g. Opacus make_private's
# private module, optimizer, Poisson loader and fast-gradient-clipping loss
TrainingWrapper = Callable[
    [nn.Module, torch.optim.Optimizer, DataLoader],
    tuple[nn.Module, torch.optim.Optimizer, DataLoader, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
]


class MnistCnn(nn.Module):
    """A small VGG-style image network: two blocks of two 3x3 convolutions and a max-pool, two dense layers.

    Same spirit as the classic PyTorch MNIST example (ReLU, dropout, no BatchNorm so
    Opacus can wrap it) but with padded convolutions in two blocks: on 2,000 MNIST
    images it reaches about 0.96 central accuracy where the classic net plateaus near
    0.95 (see benchmarks/central_accuracy.py).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 384,
        dropout: tuple[float, float] = (0.25, 0.5),
    ) -> None:
        """Create the layers for images of ``input_shape`` = (C, H, W)."""
        super().__init__()
        in_channels, height, width = input_shape
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[0], kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(channels[0], channels[1], kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(channels[1], channels[1], kernel_size=3, padding=1)
        self.dropout1 = nn.Dropout(dropout[0])
        self.dropout2 = nn.Dropout(dropout[1])
        self.fc1 = nn.Linear(channels[1] * (height // 4) * (width // 4), hidden)  # two 2x2 pools
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images."""
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)
        x = self.dropout2(F.relu(self.fc1(torch.flatten(self.dropout1(x), 1))))
        return self.fc2(x)


class TanhCnn(nn.Module):
    """A compact image network for DP-SGD: two strided convolutions and a dense layer, tanh activations.

    The MNIST network of Papernot et al., "Tempered Sigmoid Activations for Deep Learning
    with Differential Privacy" (AAAI 2021), which Opacus's MNIST example also trains: about
    26,000 parameters where ``MnistCnn`` has 1.3 million. DP-SGD adds noise of the same scale
    to every parameter, so the noise in a step grows with the square root of the parameter
    count while the clipped signal does not; bounded activations keep the clipped gradients
    informative. At ε = 8 on four nodes of 5,000 MNIST images it reaches about 0.81 federated
    and 0.87-0.92 central, where ``MnistCnn`` reaches 0.64 and 0.85-0.88
    (``benchmarks/dp_federated_sim.py``).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, *,
                 channels: tuple[int, int] = (16, 32), hidden: int = 32) -> None:
        """Create the layers for images of ``input_shape`` = (C, H, W), at least 10x10 pixels."""
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], channels[0], kernel_size=8, stride=2, padding=3)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size=4, stride=2)
        with torch.no_grad():  # the flattened size for this input shape
            features = self._features(torch.zeros((1, *input_shape))).shape[1]
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the flattened convolutional features of a batch of images."""
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2, 1)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2, 1)
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of images."""
        return self.fc2(torch.tanh(self.fc1(self._features(x))))


class Mlp(nn.Sequential):
    """A ReLU multilayer perceptron on flattened inputs; layers named fc1, fc2, ..., out."""

    def __init__(self, num_features: int, num_classes: int, *, hidden_sizes: tuple[int, ...] = (512, 256)) -> None:
        """Create flatten -> (linear, ReLU) per hidden size -> linear."""
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = num_features
        for i, size in enumerate(hidden_sizes, start=1):
            layers[f"fc{i}"] = nn.Linear(width, size)
            layers[f"relu{i}"] = nn.ReLU()
            width = size
        layers["out"] = nn.Linear(width, num_classes)
        super().__init__(layers)


class TorchLogisticRegression(nn.Sequential):
    """Multinomial logistic regression: one linear layer on flattened inputs (softmax in the loss)."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        """Create flatten -> linear."""
        super().__init__(OrderedDict(flatten=nn.Flatten(), linear=nn.Linear(num_features, num_classes)))


def resolve_device(device: str) -> str:
    """Return "cuda" for "auto" when a GPU is visible, else "cpu"; check explicit CUDA requests."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} requested but torch sees no CUDA GPU (torch {torch.__version__}); "
            f"use device='auto' or 'cpu' on this node"
        )
    return device


def build_network(name: str, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Return the untrained torch network for zoo name ``name``."""
    if name == "cnn":
        if len(input_shape) != 3:
            raise ValueError(
                f"model 'cnn' needs images (C, H, W) such as MNIST's (1, 28, 28), got tabular input "
                f"shape {input_shape}; use the model 'mlp' for tabular data"
            )
        if min(input_shape[1:]) < 4:
            raise ValueError(f"model 'cnn' needs images of at least 4x4 pixels, got {input_shape}")
        return MnistCnn(input_shape, num_classes)  # type: ignore[arg-type]
    if name == "cnn-dp":
        if len(input_shape) != 3 or min(input_shape[1:]) < 10:
            raise ValueError(f"model 'cnn-dp' needs images (C, H, W) of at least 10x10 pixels, got input shape "
                             f"{input_shape}; use the model 'mlp' for tabular data or small images")
        return TanhCnn(input_shape, num_classes)  # type: ignore[arg-type]
    if name == "mlp":
        return Mlp(prod(input_shape), num_classes)
    if name == "torch-logreg":
        return TorchLogisticRegression(prod(input_shape), num_classes)
    raise ValueError(f"no torch network named {name!r}; expected cnn, cnn-dp, mlp or torch-logreg")


@contextlib.contextmanager
def seeded(seed: int, device: str) -> Iterator[None]:
    """Seed torch inside the block and restore the caller's RNG state afterwards."""
    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


PRECISIONS = ("fp32", "bf16", "fp16")  # float32; bfloat16 or float16 autocast (fp16 with a GradScaler)


def training_precision(device: str, *, private: bool) -> str:
    """Return the precision training on ``device`` uses: fp32 on the CPU and under DP-SGD, else bf16 or fp16."""
    if private or not device.startswith("cuda"):
        return "fp32"
    with torch.cuda.device(device):  # native bfloat16 only: emulated bf16 on older GPUs is slower than fp16
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """Return autocast to ``precision`` on CUDA, or a no-op for fp32 (always so on the CPU)."""
    if precision == "fp32" or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@contextlib.contextmanager
def cuda_numerics(device: str, precision: str) -> Iterator[None]:
    """Set TF32 (off for fp32 = DP-SGD, on under autocast) and cudnn.benchmark (off) on CUDA; restore them after."""
    if not device.startswith("cuda"):
        yield  # the CPU's settings are left exactly as they are
        return
    matmul, conv, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn
    saved = matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark
    tf32 = "ieee" if precision == "fp32" else "tf32"
    matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark = tf32, tf32, False
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision, cudnn.benchmark = saved


def make_loader(data: Dataset, *, batch_size: int, seed: int | None, device: str) -> DataLoader:
    """Return a DataLoader over ``data``; shuffled with a seeded generator when ``seed`` is given."""
    tensors = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(
        tensors,
        batch_size=batch_size,
        shuffle=seed is not None,
        generator=generator,
        pin_memory=device.startswith("cuda"),
    )


SGD_MOMENTUM = 0.9


def make_optimizer(module: nn.Module, *, learning_rate: float, name: str = "adam",
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Return a fresh optimizer for ``module``: Adam, or SGD with momentum ``SGD_MOMENTUM``.

    ``weight_decay`` is torch's: ``weight_decay * w`` added to every gradient (an L2 penalty of half that).
    """
    if name == "sgd":
        return torch.optim.SGD(module.parameters(), lr=learning_rate, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    return torch.optim.Adam(module.parameters(), lr=learning_rate, weight_decay=weight_decay)


def train_epochs(
    module: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *, epochs: int, device: str,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy, precision: str = "fp32",
) -> float:
    """Train for ``epochs`` passes over ``loader`` in ``precision``; return the mean loss of the last pass."""
    module.train()
    # fp16's narrow range needs loss scaling; bf16 has float32's range and fp32 needs nothing
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    mean_loss = float("nan")
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        for x, y in loader:
            if len(y) == 0:  # Poisson sampling (DP-SGD) can draw an empty batch
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, precision):
                logits = module(x)
            loss = criterion(logits.float(), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
                scaler.update()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        mean_loss = loss_sum / max(seen, 1)
    return mean_loss


@torch.inference_mode()
def predict_logits(module: nn.Module, x: np.ndarray, *, batch_size: int, device: str) -> np.ndarray:
    """Return float32 logits of ``module`` for every row of ``x`` (eval mode, autocast on CUDA)."""
    precision = training_precision(device, private=False)  # no gradients: DP's float32 reason does not apply
    module.eval()
    chunks = []
    for start in range(0, len(x), batch_size):
        batch = torch.from_numpy(x[start : start + batch_size]).to(device)
        with autocast(device, precision):
            chunks.append(module(batch).float().cpu())
    return torch.cat(chunks).numpy()


class TorchModel:
    """A zoo network with the uniform model interface (arrays in, metrics out)."""

    def __init__(
        self, name: str, network: nn.Module, *, input_shape: tuple[int, ...], num_classes: int, device: str
    ) -> None:
        """Wrap ``network`` (already on ``device``)."""
        self.name = name
        self.network = network
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.device = device
        self.dp_fixes: list[str] = []  # layers replaced so that Opacus can train the network
        # fp32, bf16 or fp16: what the last fit trained in (any ``wrap`` counts as DP-SGD: fp32); before
        # the first fit, what a fit without ``wrap`` will use
        self.precision = training_precision(device, private=False)

    def get_arrays(self) -> dict[str, np.ndarray]:
        """Return the state dict as ordered numpy copies."""
        return {key: value.detach().cpu().numpy().copy() for key, value in self.network.state_dict().items()}

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Load ``arrays`` into the network after checking names and shapes."""
        checked = check_arrays(self.name, self.get_arrays(), arrays)
        self.network.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in checked.items()})

    def fit(
        self,
        train: Dataset,
        *,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        seed: int,
        optimizer: str = "adam",
        weight_decay: float | None = None,
        wrap: TrainingWrapper | None = None,
    ) -> dict[str, float]:
        """Train with ``optimizer``; ``wrap`` may replace (module, optimizer, loader) and the loss, e.g. for DP-SGD.

        ``weight_decay`` None: 0 (no decay).
        """
        check_fit_args(self.name, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                       optimizer=optimizer, weight_decay=weight_decay)
        check_data(self.name, train, input_shape=self.input_shape, num_classes=self.num_classes, purpose="fit")
        wall, cpu = time.perf_counter(), time.process_time()
        self.precision = training_precision(self.device, private=wrap is not None)
        with seeded(seed, self.device), cuda_numerics(self.device, self.precision):
            module: nn.Module = self.network
            step = make_optimizer(module, learning_rate=learning_rate, name=optimizer, weight_decay=weight_decay or 0.0)
            loader = make_loader(train, batch_size=batch_size, seed=seed, device=self.device)
            criterion = F.cross_entropy
            if wrap is not None:
                module, step, loader, criterion = wrap(module, step, loader)
            try:
                train_loss = train_epochs(module, loader, step, epochs=epochs, device=self.device,
                                          criterion=criterion, precision=self.precision)
            finally:
                if module is not self.network and hasattr(module, "_close"):
                    module._close()  # Opacus's wrapper: remove its hooks and per-sample gradients
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return {
            "train_loss": train_loss,
            "train_seconds": time.perf_counter() - wall,
            "train_cpu_seconds": time.process_time() - cpu,
            "num_examples": len(train),
        }

    def predict(self, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
        """Return the predicted class of every example in ``x`` (``batch_size`` bounds memory only)."""
        if len(x) == 0:
            return np.empty(0, dtype=np.int64)
        logits = predict_logits(
            self.network, np.ascontiguousarray(x, dtype=np.float32), batch_size=batch_size, device=self.device
        )
        return logits.argmax(axis=1).astype(np.int64)

    def evaluate(self, test: Dataset, *, batch_size: int) -> dict[str, float]:
        """Return cross-entropy loss, accuracy, macro F1 and num_examples on ``test``."""
        check_data(self.name, test, input_shape=self.input_shape, num_classes=self.num_classes, purpose="evaluate")
        logits = predict_logits(self.network, test.x, batch_size=batch_size, device=self.device)
        loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(test.y)).item()
        return classification_metrics(test.y, logits.argmax(axis=1), loss=loss, num_classes=self.num_classes)

    def num_parameters(self) -> int:
        """Return the number of trainable scalars."""
        return sum(p.numel() for p in self.network.parameters() if p.requires_grad)


def build_torch_model(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, seed: int, device: str, private: bool = False
) -> TorchModel:
    """Build and seed-initialize torch zoo model ``name`` on ``device``.

    ``private`` replaces the layers Opacus cannot train with DP-SGD (the fixes are kept
    in ``dp_fixes``); the zoo's networks need none.
    """
    device = resolve_device(device)
    with seeded(seed, "cpu"):  # initialize on the CPU: same weights whatever the device
        network = build_network(name, input_shape=input_shape, num_classes=num_classes)
        fixes: list[str] = []
        if private:
            from privacy.sample_level import make_compatible

            network, fixes = make_compatible(network)
    model = TorchModel(name, network.to(device), input_shape=input_shape, num_classes=num_classes, device=device)
    model.dp_fixes = fixes
    return model

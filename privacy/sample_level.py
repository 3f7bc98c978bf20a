"""Sample-level DP: DP-SGD with Opacus inside a node's (or the central reference's) training.

``dp_sgd(plan)`` returns the training wrapper that ``TorchModel.fit(wrap=...)`` applies:
Opacus's ``PrivacyEngine.make_private`` with Poisson-sampled batches, per-sample
gradients clipped to ``plan.max_grad_norm``, and Gaussian noise of
``plan.noise_multiplier``. Per-sample gradient norms use Opacus's fast gradient
clipping (``grad_sample_mode="ghost"``) — the same guarantee as the per-sample hooks
without materialising a gradient per example for the linear layers
(``benchmarks/dp_overhead.py`` measures both).

The noise and the Poisson sampling draw from a generator seeded by the operating
system, never from the run's seed: the seed is part of the run config, and noise that
can be replayed from it protects nothing. Private runs are therefore not
bit-reproducible. Opacus's ``secure_mode`` (a CSPRNG through torchcsprng, robust to
floating-point attacks on the noise) is not used: it needs torchcsprng, which the
package index this project installs from does not offer.

No Flower or Prefect import.
"""

from __future__ import annotations

import os

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from privacy.accounting import Plan

GRAD_SAMPLE_MODES = ("ghost", "hooks", "functorch", "ew")
DEFAULT_GRAD_SAMPLE_MODE = "ghost"


def secret_generator(device: str = "cpu") -> torch.Generator:
    """Return a torch generator seeded with 64 bits from the operating system."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def make_compatible(network: nn.Module) -> tuple[nn.Module, list[str]]:
    """Return ``network`` with the layers Opacus rejects replaced (BatchNorm → GroupNorm, ...), and what changed.

    The replacement changes the model's arrays, so the server and every node build
    the private model the same way (``build_model(..., private=True)``).
    """
    problems = ModuleValidator.validate(network, strict=False)
    if not problems:
        return network, []
    fixed = ModuleValidator.fix(network)
    ModuleValidator.validate(fixed, strict=True)
    return fixed, sorted({f"{type(p).__name__}: {p}" for p in problems})


def dp_sgd(plan: Plan, *, grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE):
    """Return a ``TorchModel.fit`` wrapper that trains with DP-SGD as ``plan`` says.

    The wrapper maps (module, optimizer, loader) to the private (module, optimizer,
    Poisson loader, criterion); the loss must be computed with the returned criterion
    (fast gradient clipping runs its second backward pass through it).
    """
    if plan.mode != "sample-level":
        raise ValueError(f"dp_sgd needs a sample-level plan, got mode {plan.mode!r}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {grad_sample_mode!r}")

    def wrap(module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader):
        device = next(module.parameters()).device
        poisson = DPDataLoader.from_data_loader(loader, generator=secret_generator("cpu"))
        engine = PrivacyEngine(accountant=plan.accountant)
        made = engine.make_private(
            module=module, optimizer=optimizer, data_loader=poisson, criterion=nn.CrossEntropyLoss(),
            noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            poisson_sampling=False,  # the loader above already samples, from a secret generator
            noise_generator=secret_generator(str(device)), grad_sample_mode=grad_sample_mode,
        )
        if grad_sample_mode == "ghost":
            private_module, private_optimizer, criterion, private_loader = made
        else:
            (private_module, private_optimizer, private_loader), criterion = made, nn.CrossEntropyLoss()
        expected = 1.0 / len(private_loader)
        if abs(expected - plan.sample_rate) > 1e-12:
            raise ValueError(
                f"the private loader samples at rate {expected:.6g} but the plan accounts for "
                f"{plan.sample_rate:.6g}: plan with the same number of examples and batch size"
            )
        return private_module, private_optimizer, private_loader, criterion

    return wrap

"""Privacy accounting: calibrate Gaussian noise to a target ε, and recompute ε from recorded inputs.

Everything here goes through Opacus's accountants (``rdp`` or ``prv``). A *history* is
a list of :class:`Mechanism` — (noise multiplier, sample rate, steps) — exactly the
inputs an Opacus accountant composes, so anyone holding a report can recompute ε with
``opacus.accountants`` alone.

Two uses:

* sample-level DP (DP-SGD on a node): one mechanism per round, sample rate = the
  Poisson sampling rate of the node's batches (Opacus's ``1 / len(loader)``), steps =
  local epochs × batches per epoch;
* client-level DP (noise added to the aggregate by the server): sample rate = the
  fraction of nodes that train per round, one step per round.

No Flower or Prefect import; importing this module imports torch (through Opacus).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from math import ceil

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")
MODES = ("none", "sample-level", "client-level")
# get_noise_multiplier stops its bisection within this distance below the target ε
EPSILON_TOLERANCE = 0.01


class PrivacyInfeasible(ValueError):
    """The requested guarantee cannot be met by this configuration; the message says what to change."""


@dataclass(frozen=True)
class Mechanism:
    """One batch of Gaussian-mechanism releases an accountant composes."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_tuple(self) -> tuple[float, float, int]:
        """Return the (noise_multiplier, sample_rate, steps) entry of an Opacus accountant's history."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _check_accountant(accountant: str) -> None:
    """Raise ValueError for an accountant Opacus does not offer here."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


def epsilon(history: list[Mechanism], *, delta: float, accountant: str) -> float:
    """Return the ε that composing ``history`` spends at ``delta`` (0 for an empty history)."""
    _check_accountant(accountant)
    history = [m for m in history if m.steps > 0]
    if not history:
        return 0.0
    engine = create_accountant(mechanism=accountant)
    engine.history = [m.as_tuple() for m in history]
    return float(engine.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=4096)
def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Return the smallest noise multiplier (within Opacus's tolerance) whose ``steps`` meet ``target_epsilon``.

    Kept per process: Opacus's bisection takes up to seconds at high sample rates, and a
    simulation's actor plans for hundreds of virtual nodes whose batch counts mostly agree.
    """
    _check_accountant(accountant)
    try:
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
            accountant=accountant, epsilon_tolerance=EPSILON_TOLERANCE,
        ))
    except ValueError as exc:  # Opacus: "The privacy budget is too low."
        raise PrivacyInfeasible(
            f"no noise multiplier reaches ε={target_epsilon} at δ={delta} over {steps} steps at sample rate "
            f"{sample_rate:.4g} ({exc}): raise privacy.target_epsilon, or train fewer rounds or local epochs"
        ) from None


@dataclass(frozen=True)
class Plan:
    """The noise and accounting of one node's (sample-level) or one arm's (client-level) participation."""

    mode: str
    accountant: str
    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    max_grad_norm: float
    calibrated: bool  # True: noise_multiplier was calibrated to target_epsilon; False: set by the user

    def round_mechanism(self) -> Mechanism:
        """Return what one round spends."""
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps_per_round)

    def epsilon_after(self, rounds: int) -> float:
        """Return the ε spent after ``rounds`` rounds of this plan."""
        return epsilon([Mechanism(self.noise_multiplier, self.sample_rate, self.steps_per_round * rounds)],
                       delta=self.delta, accountant=self.accountant)

    def as_dict(self) -> dict:
        """Return the plan as JSON-ready values."""
        return asdict(self)


def _noise(*, what: str, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
           noise_multiplier: float | None) -> tuple[float, bool]:
    """Calibrate the noise, or check a user-set noise multiplier against the target."""
    if noise_multiplier is None:
        return calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                               steps=steps, accountant=accountant), True
    spent = epsilon([Mechanism(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant)
    if spent > target_epsilon:
        needed = calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                 steps=steps, accountant=accountant)
        raise PrivacyInfeasible(
            f"privacy.noise_multiplier={noise_multiplier} spends ε={spent:.3g} for {what}, above "
            f"privacy.target_epsilon={target_epsilon}: raise noise_multiplier to at least {needed:.3f}, "
            "or leave it empty to calibrate it"
        )
    return noise_multiplier, False


def plan_sample_level(
    *, num_examples: int, batch_size: int, local_epochs: int, rounds: int, target_epsilon: float, delta: float,
    max_grad_norm: float, accountant: str, noise_multiplier: float | None = None, who: str = "the node",
) -> Plan:
    """Plan DP-SGD for one node so that all its rounds × local epochs together meet ``target_epsilon``.

    Batches are Poisson-sampled at Opacus's rate ``1 / ceil(num_examples / batch_size)``
    and every epoch takes that many steps.

    Raises:
        PrivacyInfeasible: too few examples, δ above 1/examples, or noise too low for the target.
    """
    _check_accountant(accountant)
    if num_examples < 2:
        raise PrivacyInfeasible(f"{who} has {num_examples} training examples; DP-SGD needs at least 2")
    if delta > 1.0 / num_examples:
        raise PrivacyInfeasible(
            f"privacy.delta={delta:g} is above 1/{num_examples} (the training examples of {who}); "
            f"set privacy.delta to at most {1.0 / num_examples:.2g}"
        )
    batches = ceil(num_examples / batch_size)
    sample_rate = 1.0 / batches
    steps = local_epochs * batches
    sigma, calibrated = _noise(what=f"{who} ({rounds} rounds × {steps} steps)", target_epsilon=target_epsilon,
                               delta=delta, sample_rate=sample_rate, steps=steps * rounds, accountant=accountant,
                               noise_multiplier=noise_multiplier)
    return Plan("sample-level", accountant, target_epsilon, delta, sigma, sample_rate, steps, rounds,
                max_grad_norm, calibrated)


def plan_client_level(
    *, num_nodes: int, sampled_nodes: int, rounds: int, target_epsilon: float, delta: float,
    clipping_norm: float, accountant: str, noise_multiplier: float | None = None,
) -> Plan:
    """Plan client-level DP for one arm: noise on the aggregate of ``sampled_nodes`` of ``num_nodes`` per round.

    Raises:
        PrivacyInfeasible: δ above 1/nodes, or noise too low for the target.
    """
    _check_accountant(accountant)
    if not 0 < sampled_nodes <= num_nodes:
        raise ValueError(f"sampled_nodes must be in 1..{num_nodes}, got {sampled_nodes}")
    if delta > 1.0 / num_nodes:
        raise PrivacyInfeasible(
            f"privacy.delta={delta:g} is above 1/{num_nodes} (the nodes of the arm, which client-level DP "
            f"protects); set privacy.delta to at most {1.0 / num_nodes:.2g}"
        )
    sample_rate = sampled_nodes / num_nodes
    sigma, calibrated = _noise(what=f"the arm's {rounds} rounds", target_epsilon=target_epsilon, delta=delta,
                               sample_rate=sample_rate, steps=rounds, accountant=accountant,
                               noise_multiplier=noise_multiplier)
    return Plan("client-level", accountant, target_epsilon, delta, sigma, sample_rate, 1, rounds,
                clipping_norm, calibrated)

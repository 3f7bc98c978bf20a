"""An independent recomputation of ε: a bare Opacus accountant stepped once per recorded step."""

from __future__ import annotations

from opacus.accountants import PRVAccountant, RDPAccountant


def independent_epsilon(history: list[list[float]], delta: float, accountant: str) -> float:
    """Recompute ε from recorded (noise multiplier, sample rate, steps), one accountant step at a time."""
    engine = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for sigma, rate, steps in history:
        for _ in range(int(steps)):
            engine.step(noise_multiplier=sigma, sample_rate=rate)
    return engine.get_epsilon(delta=delta)

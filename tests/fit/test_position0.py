"""How much position 0 counts in the fit of A (steer_core.fit.position0)."""

from __future__ import annotations

from steer_core.fit.position0 import choose_first_weight


def test_a_heavier_first_position_must_halve_the_held_in_kl() -> None:
    # held-in KL measured on SmolLM2 at 4x: L6 (the sink badly fitted), then L24 (a 20% gain that did not hold out)
    assert choose_first_weight({1.0: 0.526, 10.0: 0.172, 100.0: 0.132}) == 100.0
    assert choose_first_weight({1.0: 0.0073, 10.0: 0.0060, 100.0: 0.0192}) == 1.0
    assert choose_first_weight({1.0: 0.2}) == 1.0

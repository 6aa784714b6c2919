"""The ``[ode]`` settings, apart from the sampler that reads them: the configuration validates them
without importing Optuna, and :mod:`nas3d.samplers.ode` uses them without importing back the package
(``nas3d.samplers``) that builds it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nas3d.util import check_choice

__all__ = ["ODE_MODES", "ODESettings"]

#: ``[ode] mode``: "multi" selects by non-dominated rank and crowding distance on all objectives;
#: "single" is the seed study's greedy one-to-one selection on the first objective (val_auc).
ODE_MODES = ("multi", "single")


@dataclass(frozen=True)
class ODESettings:
    """The ``[ode]`` table: opposition-based differential evolution (``sampler = "ode"``).

    The defaults are the seed study's: population 20, rand/1 mutation with ``F`` 0.5, binomial
    crossover with ``CR`` 0.5, generation jumping with probability 0.3. Used only by ``ode``.
    """

    population: int = 20
    F: float = 0.5
    CR: float = 0.5
    jumping_rate: float = 0.3
    mode: str = "multi"

    def __post_init__(self) -> None:
        if isinstance(self.population, bool) or not isinstance(self.population, int) or self.population < 4:
            # rand/1 mutation draws three members besides the target
            raise ValueError(
                f"population must be an integer >= 4 (rand/1 needs 3 others), got {self.population!r}"
            )
        if not (math.isfinite(self.F) and 0.0 < self.F <= 2.0):
            raise ValueError(f"F must be in (0, 2], got {self.F!r}")
        for name in ("CR", "jumping_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        check_choice("mode", self.mode, ODE_MODES)

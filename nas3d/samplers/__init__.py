"""The study's sampler, chosen by name: ``tpe`` (the default), ``nsga2``, ``random`` or ``ode``.

Importing this package is cheap: a sampler's module (and Optuna's private TPE internals, for ``tpe``)
is imported only when :func:`make_sampler` builds one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nas3d.util import check_choice

if TYPE_CHECKING:
    import optuna

    from nas3d.config import StudySettings
    from nas3d.space import SearchSpace

__all__ = ["ODE_MODES", "SAMPLERS", "TPE_OPTIONS", "ODESettings", "make_sampler"]

#: The sampler names a study file or ``--sampler`` may give.
SAMPLERS = ("tpe", "nsga2", "random", "ode")

#: ``[ode] mode``: "multi" selects by non-dominated rank and crowding distance on all objectives;
#: "single" is the seed study's greedy one-to-one selection on the first objective (val_auc).
ODE_MODES = ("multi", "single")

#: The TPE settings of every nas3d study. group=True (experimental in Optuna) is what makes TPE model
#: define-by-run, conditional params jointly; multivariate: ops and edges interact; constant_liar:
#: parallel workers spread out instead of proposing the same architecture.
TPE_OPTIONS: dict[str, bool] = {"multivariate": True, "group": True, "constant_liar": True}


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


def make_sampler(
    settings: StudySettings, *, space: SearchSpace | None = None, ode: ODESettings | None = None
) -> optuna.samplers.BaseSampler:
    """The study's sampler. Constraints need no ``constraints_func``: Optuna 5 samplers read them
    from the trials (see ``nas3d.study.record_constraints``). ``space`` and ``ode`` matter to
    ``ode`` only, which proposes whole architectures of ``space`` (default: the seed space)."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    check_choice("sampler", settings.sampler, SAMPLERS)
    seed = settings.sampler_seed
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "ode":
        from nas3d.samplers.ode import ODESampler
        from nas3d.space import SearchSpace

        ode = ode or ODESettings()
        return ODESampler(
            space or SearchSpace(), population=ode.population, F=ode.F, CR=ode.CR,
            jumping_rate=ode.jumping_rate, mode=ode.mode, seed=seed,
        )
    from nas3d.samplers._tpe import SharedSplitTPESampler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # group=True, used knowingly
        return SharedSplitTPESampler(**TPE_OPTIONS, seed=seed)

"""The study's sampler, chosen by name: ``tpe`` (the default), ``nsga2``, ``random`` or ``ode``.

Importing this package is cheap: a sampler's module is imported only when :func:`make_sampler`
builds one. ``tpe`` is Optuna's own ``TPESampler``; why nas3d keeps no faster copy of it:
docs/samplers.md#tpe-optunas-own.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Protocol

from nas3d.samplers._settings import ODE_MODES, ODESettings
from nas3d.util import check_choice

if TYPE_CHECKING:
    import optuna

    from nas3d.space import SearchSpace

__all__ = ["ODE_MODES", "SAMPLERS", "TPE_OPTIONS", "ODESettings", "SamplerChoice", "make_sampler"]

#: The sampler names a study file or ``--sampler`` may give.
SAMPLERS = ("tpe", "nsga2", "random", "ode")

#: The TPE settings of every nas3d study. group=True (experimental in Optuna) is what makes TPE model
#: define-by-run, conditional params jointly; multivariate: ops and edges interact; constant_liar:
#: parallel workers spread out instead of proposing the same architecture.
TPE_OPTIONS: dict[str, bool] = {"multivariate": True, "group": True, "constant_liar": True}


class SamplerChoice(Protocol):
    """What :func:`make_sampler` reads of a study's settings (``nas3d.config.StudySettings`` has it):
    declared here, so that the samplers need nothing from the configuration that names them."""

    @property
    def sampler(self) -> str: ...

    @property
    def sampler_seed(self) -> int | None: ...


def make_sampler(
    settings: SamplerChoice, *, space: SearchSpace | None = None, ode: ODESettings | None = None,
    worker_number: int | None = None,
) -> optuna.samplers.BaseSampler:
    """The study's sampler. Constraints need no ``constraints_func``: Optuna 5 samplers read them
    from the trials (see ``nas3d.study.record_constraints``). ``space`` and ``ode`` matter to
    ``ode`` only, which proposes whole architectures of ``space`` (default: the seed space).

    ``worker_number`` (a number no other worker of the study has) seeds a worker's own sampler from
    the study's seed: workers with one seed would propose the same architectures in lockstep, and a
    restarted worker would replay its first life."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    check_choice("sampler", settings.sampler, SAMPLERS)
    seed = settings.sampler_seed
    if seed is not None and worker_number is not None:
        import numpy as np

        seed = int(np.random.SeedSequence([seed, worker_number]).generate_state(1)[0])
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # group=True, used knowingly
        return optuna.samplers.TPESampler(**TPE_OPTIONS, seed=seed)

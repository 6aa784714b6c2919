"""The study's sampler, chosen by name: ``tpe`` (the default), ``nsga2`` or ``random``.

Importing this package is cheap: a sampler's module (and Optuna's private TPE internals, for ``tpe``)
is imported only when :func:`make_sampler` builds one.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from nas3d.util import check_choice

if TYPE_CHECKING:
    import optuna

    from nas3d.config import StudySettings

__all__ = ["SAMPLERS", "TPE_OPTIONS", "make_sampler"]

#: The sampler names a study file or ``--sampler`` may give.
SAMPLERS = ("tpe", "nsga2", "random")

#: The TPE settings of every nas3d study. group=True (experimental in Optuna) is what makes TPE model
#: define-by-run, conditional params jointly; multivariate: ops and edges interact; constant_liar:
#: parallel workers spread out instead of proposing the same architecture.
TPE_OPTIONS: dict[str, bool] = {"multivariate": True, "group": True, "constant_liar": True}


def make_sampler(settings: StudySettings) -> optuna.samplers.BaseSampler:
    """The study's sampler. Constraints need no ``constraints_func``: Optuna 5 samplers read them
    from the trials (see ``nas3d.study.record_constraints``)."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    check_choice("sampler", settings.sampler, SAMPLERS)
    seed = settings.sampler_seed
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    from nas3d.samplers._tpe import SharedSplitTPESampler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # group=True, used knowingly
        return SharedSplitTPESampler(**TPE_OPTIONS, seed=seed)

# Long module: one algorithm (encoding, opposition, DE operators, selection, the sampler) whose parts
# only make sense together, documented as the seed study's method.
"""The seed study's search algorithm, opposition-based differential evolution (ODE), as an Optuna sampler.

**Encoding.** ODE evolves the seed's own chromosome, 29 reals in [0, 1] (:func:`decode`):

* genes 0-20: one per upper-triangular pair of the cell's 7 vertices, in row order
  ((0,1), (0,2), ..., (0,6), (1,2), ..., (5,6)); a value >= 0.5 means the edge is present;
* genes 21-25: the operations of vertices 1-5, each splitting [0, 1) into equal bins over the space's
  operations in the seed's order (``ops_order_in_seed``; 15 bins for the seed space);
* genes 26, 27, 28: cells per stack, stacks and initial filters, each in equal bins over its choices.

The decoded cell is pruned as everywhere in nas3d (:func:`nas3d.architecture.prune_cell`). This
encoding, not one of nas3d's define-by-run parameters, because the seed's operators are defined on it:
rand/1 and the two oppositions act on fixed-length real vectors, and nas3d's parameters change in
number and meaning with the cell's size. Each proposal is then mapped to nas3d's parameters
(:func:`nas3d.space.params_for`), so ``FixedTrial(trial.params)`` rebuilds it and the objective,
deduplication and dashboard see an ordinary trial.

**Search** (the seed's; every stage has exactly ``population`` members, one trial per slot):

* stage 0 ``init``: uniform random vectors; stage 1 ``opposite``: ``1 - x`` of stage 0's slot x.
  The best ``population`` of both make the population.
* a ``de`` stage: for each slot i, rand/1 mutation ``v = x_r1 + F (x_r2 - x_r3)`` (r1, r2, r3 distinct
  and not i; genes out of [0, 1] redrawn uniformly), binomial crossover with the target x_i at rate
  ``CR`` taking at least one gene from v. Then selection (below).
* after a ``de`` stage, with probability ``jumping_rate``, a ``jump`` stage: the opposite of the
  population within its per-gene min/max, ``min + max - x``; the best ``population`` of both are kept.

Selection: ``mode="single"`` is the seed's, on the first objective (val_auc): greedy one-to-one in a
``de`` stage (the child replaces its target unless worse), best ``population`` after ``opposite`` and
``jump``. ``mode="multi"`` keeps the best ``population`` of parents and children by non-dominated
rank, then crowding distance (NSGA-II's elitist rule, as in DEMO), on all of the study's objectives.
Feasibility first (Deb's rule, as Optuna's NSGA-II): a trial over a ``[constraints]`` cap ranks below
every feasible one, by its total violation; a FAILED trial that was not retried ranks last.

**Trials the objective prunes.** A duplicate (``duplicate_of``) is a member with the values of the
trial it duplicates (``duplicate_values``): the seed, too, looked up a known architecture's fitness
instead of training it again. An over-constraint trial is an infeasible member (above). The sampler
avoids both kinds of waste where it can: a decode that is infeasible (not connected, too few vertices,
too many edges, outside the space) or that is an architecture already proposed in the study is redrawn
(a new mutant for ``de``; a uniform random vector for ``init`` and for an opposite, whose point is
fixed), up to :data:`MAX_REDRAWS` times; the counts are kept in the trial's system attrs
(``ode:redraws``). Only when every redraw is a duplicate (a tiny space) is a duplicate proposed.

**Shared state.** Everything lives in the study's storage, in trial system attrs, as NSGA-II keeps its
generations: each proposal records its stage, slot, stage kind and vector. Every ``ask`` rebuilds the
run from the trials, so any number of workers share one run. The next proposal fills the lowest free
slot of the first stage not fully claimed, so no stage is lost or doubled as long as asks do not
race: nas3d workers hold the study lock from their budget check through ``ask``. (Two processes
asking at the same instant without that lock may claim one slot twice; the lower trial number is the
member, the other is evaluated but ignored.) A stage may start before the previous one has finished
training (workers never wait): its proposals then use the population as known so far, and the
selection is replayed with every result once they are in. One worker, or workers in step, give
exactly the seed's generational algorithm. A trial that fails and is retried (heartbeat or
interruption) keeps its slot; the retry is the member.

Trials the sampler did not propose (enqueued warm starts) are outside the run.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import moocore
import numpy as np
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from nas3d import records
from nas3d.architecture import Architecture, InfeasibleArchitecture, prune_cell
from nas3d.pareto import crowding_distances
from nas3d.samplers._settings import ODE_MODES, ODESettings
from nas3d.seeds import seed_document
from nas3d.space import SearchSpace, params_for
from nas3d.util import check_choice

__all__ = [
    "GENES",
    "MAX_REDRAWS",
    "ODESampler",
    "decode",
    "encode",
    "jump_opposite",
    "op_order",
    "opposite",
]

logger = logging.getLogger(__name__)

VERTICES = 7  # the seed's cell: input, five operations, output
EDGE_PAIRS: tuple[tuple[int, int], ...] = tuple(itertools.combinations(range(VERTICES), 2))
OP_VERTICES = VERTICES - 2
EDGE_GENES = slice(0, len(EDGE_PAIRS))  # 21
OP_GENES = slice(len(EDGE_PAIRS), len(EDGE_PAIRS) + OP_VERTICES)  # 21..25
CELLS_GENE, STACKS_GENE, FILTERS_GENE = 26, 27, 28
GENES = 29
EDGE_THRESHOLD = 0.5

#: Redraws of one proposal before a duplicate is accepted (infeasible decodes are always redrawn).
MAX_REDRAWS = 100
#: Uniform draws tried for one feasible vector before the space is called empty.
MAX_RANDOM_DRAWS = 10_000

# The system attrs of a proposal (nas3d.records)
STAGE, SLOT, KIND, VECTOR, PARAMS, HASH, REDRAWS = (
    records.ODE_STAGE, records.ODE_SLOT, records.ODE_KIND, records.ODE_VECTOR, records.ODE_PARAMS,
    records.ODE_HASH, records.ODE_REDRAWS,
)
INIT, OPPOSITE, DE, JUMP = "init", "opposite", "de", "jump"
SEED_SPACE = SearchSpace()


# --- the chromosome ------------------------------------------------------------------------------


def op_order(space: SearchSpace) -> tuple[str, ...]:
    """The space's operations in the seed's gene order (``ops_order_in_seed``); others after them."""
    seed = seed_document()["ops_order_in_seed"]
    rank = {op: i for i, op in enumerate(seed)}
    return tuple(sorted(space.ops, key=lambda op: (rank.get(op, len(seed)), space.ops.index(op))))


def _bin(x: float, n: int) -> int:
    """Which of ``n`` equal bins of [0, 1) holds ``x``; 1.0 itself falls in the last bin."""
    return min(int(x * n), n - 1)


def decode(vector: Sequence[float], space: SearchSpace = SEED_SPACE) -> Architecture:
    """The pruned architecture a 29-gene vector encodes (see the module docstring).

    Raises :class:`~nas3d.architecture.InfeasibleArchitecture` when the cell prunes to nothing
    trainable, has more than ``space.max_edges`` edges, or lies outside ``space``.
    """
    x = np.asarray(vector, dtype=float)
    if x.shape != (GENES,) or not np.all((x >= 0.0) & (x <= 1.0)):
        raise ValueError(f"an ODE vector holds {GENES} genes in [0, 1], got shape {x.shape}: {x.tolist()}")
    ops_choices = op_order(space)
    ops = [ops_choices[_bin(g, len(ops_choices))] for g in x[OP_GENES]]
    edges = [pair for pair, g in zip(EDGE_PAIRS, x[EDGE_GENES], strict=True) if g >= EDGE_THRESHOLD]
    arch = prune_cell(
        ops,
        edges,
        cells_per_stack=space.cells_per_stack[_bin(x[CELLS_GENE], len(space.cells_per_stack))],
        stacks=space.stacks[_bin(x[STACKS_GENE], len(space.stacks))],
        initial_filters=space.initial_filters[_bin(x[FILTERS_GENE], len(space.initial_filters))],
        max_edges=space.max_edges,
    )
    if len(arch.ops) > space.max_op_vertices:
        raise InfeasibleArchitecture(
            f"{len(arch.ops)} operation vertices remain (the space allows {space.max_op_vertices})"
        )
    return arch


def encode(arch: Architecture, space: SearchSpace = SEED_SPACE) -> np.ndarray:
    """A vector that :func:`decode` maps back to ``arch``: bin centres, edges at 0.25 / 0.75.

    The pruned cell's operation vertices take vertices 1..m of the 7, its output vertex 6; the unused
    vertices are isolated, so pruning removes them again.
    """
    if len(arch.ops) > OP_VERTICES:
        raise ValueError(f"the ODE encoding holds at most {OP_VERTICES} operation vertices, got {arch}")
    place = {v: v for v in range(arch.output_vertex)}
    place[arch.output_vertex] = VERTICES - 1
    present = {(place[a], place[b]) for a, b in arch.edges}
    x = np.empty(GENES)
    x[EDGE_GENES] = [0.75 if pair in present else 0.25 for pair in EDGE_PAIRS]
    ops_choices = op_order(space)

    def centre(choices: Sequence[Any], value: Any) -> float:
        if value not in choices:
            raise ValueError(f"{arch} is outside the space: {value!r} is not among {list(choices)}")
        return (list(choices).index(value) + 0.5) / len(choices)

    x[OP_GENES] = [centre(ops_choices, op) for op in arch.ops] + [0.5 / len(ops_choices)] * (
        OP_VERTICES - len(arch.ops)
    )
    x[CELLS_GENE] = centre(space.cells_per_stack, arch.cells_per_stack)
    x[STACKS_GENE] = centre(space.stacks, arch.stacks)
    x[FILTERS_GENE] = centre(space.initial_filters, arch.initial_filters)
    return x


def opposite(x: np.ndarray) -> np.ndarray:
    """The opposite point of the initial population: ``1 - x``."""
    return 1.0 - np.asarray(x, dtype=float)


def jump_opposite(population: np.ndarray) -> np.ndarray:
    """Generation jumping: each member's opposite within the population's per-gene interval,
    ``min + max - x``."""
    pop = np.asarray(population, dtype=float)
    return pop.min(axis=0) + pop.max(axis=0) - pop


# --- members and selection -----------------------------------------------------------------------

FEASIBLE, INFEASIBLE, FAILED = 0, 1, 2


@dataclass(frozen=True)
class Result:
    """What selection knows of a finished member: its class, losses (minimised) and violation."""

    klass: int  # FEASIBLE, INFEASIBLE (over a constraint) or FAILED
    losses: tuple[float, ...] = ()
    violation: float = 0.0


@dataclass(frozen=True)
class Member:
    number: int  # the trial's number
    vector: np.ndarray
    result: Result | None  # None while the trial is running or waiting


def _result(trial: FrozenTrial, directions: Sequence[StudyDirection]) -> Result | None:
    signs = [1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in directions]
    if trial.state in (TrialState.RUNNING, TrialState.WAITING):
        return None
    values = trial.values if trial.state == TrialState.COMPLETE else None
    if values is None and trial.state == TrialState.PRUNED:
        values = trial.user_attrs.get(records.DUPLICATE_VALUES)  # the known architecture's result
    violation = sum(max(0.0, float(c)) for c in (trial.system_attrs.get(records.CONSTRAINTS) or ()))
    if values is not None and len(values) == len(signs) and violation == 0.0:
        return Result(FEASIBLE, tuple(s * float(v) for s, v in zip(signs, values, strict=True)))
    if violation > 0.0:
        return Result(INFEASIBLE, violation=violation)
    return Result(FAILED)


def _single_key(result: Result) -> tuple[int, float]:
    """Order for single-objective mode: feasible by the first loss, then violation, then failed."""
    if result.klass == FEASIBLE:
        return FEASIBLE, result.losses[0]
    return result.klass, result.violation


def select_best(members: Sequence[Member], n: int, mode: str) -> list[Member]:
    """The best ``n`` finished members, best first (see the module docstring for the order)."""
    finished = [(m, m.result) for m in members if m.result is not None]
    feasible = [(m, r) for m, r in finished if r.klass == FEASIBLE]
    others = [m for m, r in sorted(((m, r) for m, r in finished if r.klass != FEASIBLE),
                                   key=lambda mr: (_single_key(mr[1]), mr[0].number))]
    if mode == "single" or not feasible:
        chosen = [m for m, r in sorted(feasible, key=lambda mr: (_single_key(mr[1]), mr[0].number))]
    else:
        losses = np.array([r.losses for _, r in feasible])
        ranks = moocore.pareto_rank(losses)
        chosen = []
        for rank in range(int(ranks.max()) + 1):
            front = [i for i in range(len(feasible)) if ranks[i] == rank]
            crowd = dict(zip(front, crowding_distances(losses[front]), strict=True))
            front.sort(key=lambda i: (-crowd[i], feasible[i][0].number))
            chosen.extend(feasible[i][0] for i in front)
            if len(chosen) >= n:
                break
    return (chosen + others)[:n]


def _not_worse(child: Result, parent: Result) -> bool:
    return _single_key(child) <= _single_key(parent)


# --- the run as the storage holds it ---------------------------------------------------------------


@dataclass
class _Stage:
    kind: str
    slots: dict[int, Member]  # claimed slots


class _Run:
    """The ODE run rebuilt from a study's trials."""

    def __init__(self, study: Study, population: int, mode: str) -> None:
        self.n = population
        self.mode = mode
        trials = study._get_trials(deepcopy=False, use_cache=False)
        # A failed trial re-queued (heartbeat or interruption) is followed to its latest retry.
        retried_by = {
            records.retry_of(t)[-1]: t for t in trials if records.retry_of(t)
        }
        directions = study.directions
        self.known_hashes: set[str] = set()
        self.stages: list[_Stage] = []
        for trial in trials:  # the objective's hash of every trial, and the hash of every proposal
            hashes = (trial.user_attrs.get(records.ARCH_HASH), trial.system_attrs.get(HASH))
            self.known_hashes.update(h for h in hashes if h)
        for trial in sorted(trials, key=lambda t: t.number):
            attrs = trial.system_attrs
            if STAGE not in attrs or records.retry_of(trial):
                continue  # not an ODE proposal, or a retry (reached through its failed original)
            stage, slot = int(attrs[STAGE]), int(attrs[SLOT])
            while len(self.stages) <= stage:
                self.stages.append(_Stage(kind="", slots={}))
            if not self.stages[stage].kind:
                self.stages[stage].kind = attrs[KIND]
            if slot in self.stages[stage].slots:
                continue  # claimed twice by racing asks: the lower trial number is the member
            latest = trial
            while latest.state == TrialState.FAIL and latest.number in retried_by:
                latest = retried_by[latest.number]
            member = Member(trial.number, np.asarray(attrs[VECTOR], dtype=float), _result(latest, directions))
            self.stages[stage].slots[slot] = member

    def next_slot(self) -> tuple[int, int]:
        """The stage and slot the next proposal fills."""
        for s, stage in enumerate(self.stages):
            free = [i for i in range(self.n) if i not in stage.slots]
            if free:
                return s, free[0]
        return len(self.stages), 0

    def population(self, before: int) -> list[Member | None]:
        """The population after stages ``0 .. before-1``, as far as their results are known.

        Slot-aligned (single mode's greedy selection compares slot i's child with member i);
        None where no finished member is known yet.
        """
        pop: list[Member | None] = [None] * self.n
        for s in range(min(before, len(self.stages))):
            stage = self.stages[s]
            if stage.kind == INIT:
                continue  # selected together with its opposite
            children = list(stage.slots.items())
            if stage.kind == OPPOSITE:
                pool = list(self.stages[0].slots.values()) + [m for _, m in children]
            elif stage.kind == DE and self.mode == "single":
                for i, child in children:
                    if child.result is None:
                        continue
                    parent = pop[i]
                    if parent is None or parent.result is None or _not_worse(child.result, parent.result):
                        pop[i] = child
                continue
            else:  # DE in multi mode, and jumps: elitist selection of parents and children
                pool = [m for m in pop if m is not None] + [m for _, m in children]
            best = select_best(pool, self.n, self.mode)
            pop = [*best, *[None] * (self.n - len(best))]
        return pop


# --- the sampler ----------------------------------------------------------------------------------


class ODESampler(BaseSampler):
    """Opposition-based differential evolution over nas3d's search space (module docstring).

    Args:
        space: the search space proposals come from (the study's ``[space]``).
        population: members per stage (the seed: 20).
        F: rand/1's differential weight. CR: binomial crossover rate.
        jumping_rate: probability of a generation jump after each DE stage.
        mode: "multi" (rank + crowding on all objectives) or "single" (the seed's greedy selection
            on the first objective).
        seed: seeds this sampler's random draws; with one worker, a seed fixes every proposal.
    """

    def __init__(
        self,
        space: SearchSpace = SEED_SPACE,
        *,
        population: int = 20,
        F: float = 0.5,  # the names every DE paper uses
        CR: float = 0.5,
        jumping_rate: float = 0.3,
        mode: str = "multi",
        seed: int | None = None,
    ) -> None:
        ODESettings(population=population, F=F, CR=CR, jumping_rate=jumping_rate, mode=mode)  # validates
        check_choice("mode", mode, ODE_MODES)
        self.space = space
        self.population = population
        self.F, self.CR, self.jumping_rate, self.mode = F, CR, jumping_rate, mode
        self._rng = np.random.default_rng(seed)
        self._fallback = RandomSampler(seed=seed)
        self._proposals: dict[int, dict[str, Any]] = {}  # trial id -> params, for this process's trials
        self._claiming = threading.Lock()  # threads of one process (optimize(n_jobs>1)) claim in turn

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self._fallback.reseed_rng()

    # Define-by-run: every parameter is answered in sample_independent from the trial's proposal.
    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        attrs = trial.system_attrs
        if records.retry_of(trial) and self._inherit_slot(study, trial):
            return
        if trial.params or records.FIXED_PARAMS in attrs:
            return  # enqueued with its parameters (or a retry of such a trial): outside the run
        with self._claiming:
            self._claim(study, trial)

    def _claim(self, study: Study, trial: FrozenTrial) -> None:
        run = _Run(study, self.population, self.mode)
        stage, slot = run.next_slot()
        kind = self._stage_kind(run, stage)
        vector, arch, redraws = self._propose(run, stage, slot, kind)
        params = params_for(arch, self.space)
        self._proposals[trial._trial_id] = params
        storage = study._storage
        # STAGE last: a reader sees a claim only once the rest of it is written.
        for key, value in (
            (VECTOR, [float(g) for g in vector]), (PARAMS, params), (HASH, arch.arch_hash()),
            (REDRAWS, redraws), (KIND, kind), (SLOT, slot), (STAGE, stage),
        ):
            storage.set_trial_system_attr(trial._trial_id, key, value)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        params = self._proposals.get(trial._trial_id)
        if params is None:
            params = trial.system_attrs.get(PARAMS)  # proposed by this sampler in another process
        if params is not None and param_name in params:
            value = params[param_name]
            if param_distribution._contains(param_distribution.to_internal_repr(value)):
                return value
        # Not a proposal of this sampler (a partially enqueued trial), or a parameter it did not plan.
        logger.debug("ode: %s of trial %d drawn at random", param_name, trial.number)
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._proposals.pop(trial._trial_id, None)

    # --- proposals ---------------------------------------------------------------------------------

    def _inherit_slot(self, study: Study, trial: FrozenTrial) -> bool:
        """A retry keeps its failed original's slot (Optuna's retry copies the system attrs already;
        a retry from before it did gets them here). False if the original had no proposal (a trial
        orphaned by a lost ask before this sampler claimed it): the retry is claimed afresh."""
        if STAGE in trial.system_attrs:
            return True
        original = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
            study._study_id, records.retry_of(trial)[-1]))
        if STAGE not in original.system_attrs:
            return False
        for key in (VECTOR, PARAMS, HASH, KIND, SLOT, STAGE):  # STAGE last, as in _claim
            if key in original.system_attrs:
                study._storage.set_trial_system_attr(trial._trial_id, key, original.system_attrs[key])
        return True

    def _stage_kind(self, run: _Run, stage: int) -> str:
        if stage < len(run.stages) and run.stages[stage].kind:
            return run.stages[stage].kind  # decided by the stage's first proposal
        if stage == 0:
            return INIT
        if stage == 1:
            return OPPOSITE
        previous = run.stages[stage - 1].kind
        if previous == DE and self._rng.random() < self.jumping_rate:
            return JUMP
        return DE

    def _random_vector(self) -> np.ndarray:
        return self._rng.random(GENES)

    def _candidate(
        self, run: _Run, pop: list[Member | None], slot: int, kind: str, attempt: int
    ) -> np.ndarray:
        """Proposal number ``attempt`` for ``slot``: redraws of an opposite are uniform random (its
        point is fixed), redraws of a DE child are new mutants, and after MAX_REDRAWS all are random."""
        if kind == INIT or attempt >= MAX_REDRAWS or (kind in (OPPOSITE, JUMP) and attempt > 0):
            return self._random_vector()
        if kind == OPPOSITE:
            return opposite(run.stages[0].slots[slot].vector)
        known = [m for m in pop if m is not None]
        if not known:  # no result at all yet (asks far ahead of training): explore
            return self._random_vector()
        if kind == JUMP:
            me = pop[slot] if pop[slot] is not None else known[slot % len(known)]
            return jump_opposite(np.array([me.vector, *(m.vector for m in known)]))[0]
        return self._mutant(pop, known, slot)

    def _mutant(self, pop: list[Member | None], known: list[Member], slot: int) -> np.ndarray:
        """rand/1 mutation and binomial crossover for the target in ``slot``."""
        rng = self._rng
        target = pop[slot] if pop[slot] is not None else known[int(rng.integers(len(known)))]
        others = [m for m in known if m.number != target.number]
        if len(others) >= 3:
            r1, r2, r3 = (others[i] for i in rng.choice(len(others), 3, replace=False))
        else:  # fewer results than rand/1 needs so far: draw with replacement from what is known
            r1, r2, r3 = (known[i] for i in rng.integers(len(known), size=3))
        v = r1.vector + self.F * (r2.vector - r3.vector)
        out = (v < 0.0) | (v > 1.0)
        v[out] = rng.random(int(out.sum()))  # the seed redraws genes out of range uniformly
        take = rng.random(GENES) < self.CR
        take[rng.integers(GENES)] = True  # at least one gene from the mutant
        return np.where(take, v, target.vector)

    def _propose(self, run: _Run, stage: int, slot: int, kind: str) -> tuple[np.ndarray, Architecture, dict]:
        """A feasible, preferably new architecture for ``slot``, with the redraws it took."""
        pop = run.population(stage) if kind in (DE, JUMP) else []
        redraws = {"infeasible": 0, "duplicate": 0}
        duplicate: tuple[np.ndarray, Architecture] | None = None
        for attempt in itertools.count():
            vector = self._candidate(run, pop, slot, kind, attempt)
            try:
                arch = decode(vector, self.space)
            except InfeasibleArchitecture:
                redraws["infeasible"] += 1
                if attempt >= MAX_RANDOM_DRAWS:
                    raise ValueError(
                        f"ode: no feasible architecture in {MAX_RANDOM_DRAWS} draws; the space "
                        f"(max_edges={self.space.max_edges}, max_op_vertices={self.space.max_op_vertices}) "
                        "is too narrow for the 7-vertex encoding"
                    ) from None
                continue
            if arch.arch_hash() not in run.known_hashes:
                return vector, arch, redraws
            redraws["duplicate"] += 1
            duplicate = duplicate or (vector, arch)
            if redraws["duplicate"] >= MAX_REDRAWS:
                return duplicate[0], duplicate[1], redraws  # every redraw is known: a tiny space
        raise AssertionError("unreachable")

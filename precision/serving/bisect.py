"""Which of a serving configuration's settings makes it fail: delta debugging over engine settings.

A serving configuration differs from the eager capture baseline in several engine settings at once
(``max_num_seqs``, ``enable_prefix_caching``, ``max_num_batched_tokens``, ``enforce_eager``, ...). When it fails
parity, the user needs to know which of them is responsible. Zeller and Hildebrandt's ddmin ("Simplifying and
Isolating Failure-Inducing Input", TSE 2002) finds a 1-minimal failing subset of the changed settings with few
trials: each trial is a short capture in real use, so trials are memoised and counted.

Why ddmin and not one trial per setting: two settings may only fail together (an interaction), which
one-at-a-time trials cannot see, and a single culprit among n settings costs at most 2*ceil(log2 n) trials
instead of n. The worst case is n^2 + 3n trials (ddmin's bound), which for a handful of settings is still small.

A subset is applied over the baseline: a trial runs ``{**baseline, **subset}``. Some settings cannot be applied
alone (``max_num_batched_tokens`` below the prompt length is a chunked prefill, which vLLM accepts only with
``enable_chunked_prefill``): a dependency map closes every subset before it runs, and the settings pulled in that
way are reported apart from the culprit itself.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from precision.errors import PrecisionError


class BisectionError(PrecisionError):
    """A bisection that cannot run as asked: a dependency on a setting the configuration does not change."""


class Outcome(enum.Enum):
    FAIL = "fail"
    PASS = "pass"
    UNRESOLVED = "unresolved"  # the trial could not be judged (e.g. the engine refused the settings)


TrialCallback = Callable[[dict[str, Any]], "bool | None"]
"""``fails(subset)``: True when the baseline with ``subset`` applied over it fails, False when it passes, None when
the trial cannot be judged (ddmin then treats the subset as not failing, as Zeller's ddmin does)."""


@dataclass(frozen=True)
class Trial:
    """One trial as it ran: the settings applied over the baseline (dependencies included) and its outcome."""

    number: int
    settings: dict[str, Any]
    outcome: Outcome


@dataclass(frozen=True)
class BisectionResult:
    """What the bisection found, and every trial it ran (for the report).

    ``culprit`` is the 1-minimal failing subset ddmin found (removing any one of its settings makes the trial pass);
    ``required`` the settings the dependency map added so that the culprit could be applied; ``responsible`` both
    together, as they ran. All empty when the full configuration does not fail (``reproduced`` False) or the baseline
    itself fails (``baseline_fails`` True): then there is nothing a setting could be blamed for."""

    changed: dict[str, Any]
    unchanged: tuple[str, ...]
    reproduced: bool
    baseline_fails: bool | None
    culprit: dict[str, Any]
    required: dict[str, Any]
    trials: tuple[Trial, ...]
    dependencies: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def trial_count(self) -> int:
        return len(self.trials)

    @property
    def responsible(self) -> dict[str, Any]:
        return {**self.culprit, **self.required}

    @property
    def interaction(self) -> bool:
        """Two or more settings fail only together: none of them fails alone (1-minimality)."""
        return len(self.culprit) > 1

    def describe(self) -> str:
        """One sentence for the report, built from this bisection's own trials."""
        trials = f"{self.trial_count} trial{'s' if self.trial_count != 1 else ''}"
        if not self.changed:
            return "the configuration sets nothing the baseline does not: nothing to bisect"
        if self.baseline_fails:
            return (f"the baseline itself fails against the baseline capture ({trials}): the difference is not caused by a setting "
                    "(run-to-run nondeterminism?), so no setting is named")
        if not self.reproduced and self.trials and self.trials[0].outcome is Outcome.UNRESOLVED:
            return f"the full configuration ({_settings_text(self.changed)}) could not be judged (the trial did not run): no bisection"
        if not self.reproduced:
            return f"the full configuration ({_settings_text(self.changed)}) does not fail ({trials}): no bisection"
        needs = f", with {_settings_text(self.required)}, which it needs to apply" if self.required else ""
        if self.interaction:
            return (f"settings {_settings_text(self.culprit)} fail only together (an interaction: each alone passes){needs}; "
                    f"found in {trials} over {len(self.changed)} changed settings")
        return f"setting {_settings_text(self.culprit)} alone makes it fail{needs}; found in {trials} over {len(self.changed)} changed settings"


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in settings.items())


def vllm_setting_dependencies(baseline: Mapping[str, Any], failing: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """The dependency map for vLLM engine settings, from the values at hand (vLLM 0.32's own checks):

    - ``max_num_batched_tokens`` below ``max_model_len`` is refused by vLLM's SchedulerConfig unless chunked prefill
      is on: when the configuration sets ``enable_chunked_prefill`` too, the budget needs it;
    - ``tensor_parallel_size`` > 1 on the CPU build runs its ranks as processes: when the configuration names a
      ``distributed_executor_backend``, the parallel size needs it.
    Only settings the configuration itself sets are named (a dependency on an unset one is an error for
    ``bisect_settings``, not something to invent)."""
    merged = {**baseline, **failing}
    needs: dict[str, tuple[str, ...]] = {}
    budget, max_len = merged.get("max_num_batched_tokens"), merged.get("max_model_len")
    if "max_num_batched_tokens" in failing and "enable_chunked_prefill" in failing and failing["enable_chunked_prefill"]:
        if isinstance(budget, int) and isinstance(max_len, int) and budget < max_len:
            needs["max_num_batched_tokens"] = ("enable_chunked_prefill",)
    if "distributed_executor_backend" in failing and isinstance(failing.get("tensor_parallel_size"), int) and failing["tensor_parallel_size"] > 1:
        needs["tensor_parallel_size"] = ("distributed_executor_backend",)
    return needs


def ddmin_trial_bound(changes: int) -> int:
    """ddmin's worst-case number of trials over ``changes`` settings: n^2 + 3n (Zeller & Hildebrandt 2002, sec. 5),
    plus the two checks made before it (the full configuration and the baseline)."""
    return changes * changes + 3 * changes + 2


def single_culprit_trial_bound(changes: int) -> int:
    """Trials for a single failing setting that fails alone: each halving tests at most both halves, so
    2*ceil(log2 n), plus the two checks made before it."""
    return 2 * math.ceil(math.log2(changes)) + 2 if changes > 1 else 2


def bisect_settings(baseline: Mapping[str, Any], failing: Mapping[str, Any], fails: TrialCallback, *,
                    dependencies: Mapping[str, Iterable[str]] | None = None, check_baseline: bool = True,
                    known_to_fail: bool = False) -> BisectionResult:
    """The smallest subset of ``failing``'s settings that, applied over ``baseline``, still fails.

    ``fails(subset)`` runs one trial (the caller applies ``subset`` over the baseline). Settings whose value in
    ``failing`` equals the baseline's are not changes and never bisected. ``dependencies`` maps a setting to the
    settings it cannot be applied without (``{"max_num_batched_tokens": ["enable_chunked_prefill"]}``); each must
    be a change of ``failing`` too. The full configuration is tried first (if it passes, there is nothing to
    bisect), then, with ``check_baseline``, the baseline alone (an empty subset: if it fails, the run is not
    deterministic and no setting is to blame). ``known_to_fail``: the caller has just seen the full configuration
    fail (the run being bisected), so it is not tried again; the trial record then starts with the baseline."""
    changed = {key: value for key, value in failing.items() if key not in baseline or baseline[key] != value}
    unchanged = tuple(key for key in failing if key not in changed)
    needs = _checked_dependencies(dependencies or {}, changed)
    runner = _TrialRunner(changed, needs, fails)
    result = dict(changed=changed, unchanged=unchanged, dependencies={k: tuple(v) for k, v in needs.items()})
    if not changed:
        return BisectionResult(reproduced=False, baseline_fails=None, culprit={}, required={}, trials=(), **result)
    if known_to_fail:
        runner.assume(tuple(changed), Outcome.FAIL)
    elif runner.run(tuple(changed)) is not Outcome.FAIL:
        return BisectionResult(reproduced=False, baseline_fails=None, culprit={}, required={}, trials=runner.trials(), **result)
    baseline_fails = None
    if check_baseline:
        baseline_fails = runner.run(()) is Outcome.FAIL
        if baseline_fails:
            return BisectionResult(reproduced=True, baseline_fails=True, culprit={}, required={}, trials=runner.trials(), **result)
    core = _ddmin(tuple(changed), runner)
    closed = runner.closure(core)
    return BisectionResult(reproduced=True, baseline_fails=baseline_fails, culprit={k: changed[k] for k in core},
                           required={k: changed[k] for k in closed if k not in core}, trials=runner.trials(), **result)


def _checked_dependencies(dependencies: Mapping[str, Iterable[str]], changed: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    needs: dict[str, tuple[str, ...]] = {}
    for key, required in dependencies.items():
        if key not in changed:
            continue
        required = tuple(required)
        missing = [name for name in required if name not in changed]
        if missing:
            raise BisectionError(f"setting {key}={changed[key]!r} cannot be applied without {missing}, which the configuration "
                                 f"does not change from the baseline; add {missing} to the configuration or drop {key}")
        needs[key] = required
    return needs


class _TrialRunner:
    """Runs trials on dependency-closed subsets, once each (memoised on the closed set of setting names)."""

    def __init__(self, changed: dict[str, Any], needs: dict[str, tuple[str, ...]], fails: TrialCallback):
        self._changed, self._needs, self._fails = changed, needs, fails
        self._memo: dict[frozenset[str], Outcome] = {}
        self._trials: list[Trial] = []

    def closure(self, keys: Iterable[str]) -> tuple[str, ...]:
        """``keys`` and everything they need, transitively, in the configuration's order."""
        closed, pending = set(), list(keys)
        while pending:
            key = pending.pop()
            if key not in closed:
                closed.add(key)
                pending.extend(self._needs.get(key, ()))
        return tuple(key for key in self._changed if key in closed)

    def run(self, keys: Iterable[str]) -> Outcome:
        closed = self.closure(keys)
        memo_key = frozenset(closed)
        if memo_key not in self._memo:
            settings = {key: self._changed[key] for key in closed}
            verdict = self._fails(dict(settings))
            outcome = Outcome.UNRESOLVED if verdict is None else Outcome.FAIL if verdict else Outcome.PASS
            self._memo[memo_key] = outcome
            self._trials.append(Trial(number=len(self._trials) + 1, settings=settings, outcome=outcome))
        return self._memo[memo_key]

    def assume(self, keys: Iterable[str], outcome: Outcome) -> None:
        """Record an outcome observed outside the bisection (not a trial it ran, so not counted)."""
        self._memo[frozenset(self.closure(keys))] = outcome

    def trials(self) -> tuple[Trial, ...]:
        return tuple(self._trials)


def _split(items: tuple[str, ...], parts: int) -> list[tuple[str, ...]]:
    """``items`` cut into ``parts`` contiguous pieces whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(items[start:end])
        start = end
    return pieces


def _ddmin(changes: tuple[str, ...], runner: _TrialRunner) -> tuple[str, ...]:
    """Zeller's ddmin, iteratively: ``changes`` fails; returns a 1-minimal failing subset of it."""
    granularity = 2
    while len(changes) > 1:
        pieces = _split(changes, granularity)
        failing_piece = next((piece for piece in pieces if runner.run(piece) is Outcome.FAIL), None)
        if failing_piece is not None:
            changes, granularity = failing_piece, 2
            continue
        # With two pieces each complement is the other piece, already tried.
        complements = [] if granularity == 2 else [tuple(c for c in changes if c not in piece) for piece in pieces]
        failing_complement = next((rest for rest in complements if runner.run(rest) is Outcome.FAIL), None)
        if failing_complement is not None:
            changes, granularity = failing_complement, max(granularity - 1, 2)
            continue
        if granularity >= len(changes):
            break
        granularity = min(len(changes), 2 * granularity)
    return changes

"""AGPE's adaptive sparsity schedule: the global target density follows training feedback.

Note [Adaptive schedule]
~~~~~~~~~~~~~~~~~~~~~~~~
The target moves on a LADDER of densities: the density buckets between the start and the
final density, plus both ends. With the default buckets, a start of 1.0 and a final
density of 0.1 the ladder is ``1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1``. Every rung is in
its own bucket (except a start density that is not a bucket value, which shares the
bucket of the rung above it), so the kernel layouts re-bucket only when the rung
changes, at most ``len(ladder) - 1 + 2 * max_backoffs`` times, and compile one graph per
rung (and kind of call), not one per visit: a return to a rung puts every layer back in
the layout bucket it had there, wherever those buckets can hold the budget (Note [Layouts
a target had before] in sparsifier.py). ``max_density``
(at least the start density) puts a higher rung on top for back-offs to return to, above
a sparse start.

At each update the mean training loss of the last interval is smoothed
(``s = a * s + (1 - a) * loss``) and compared with the previous smoothed value:
``rel = (s_prev - s) / |s_prev|``. Then, in this order:

1. deadline: if the remaining updates before ``end_step`` are no more than the rungs
   left, go down (one rung, or as many as needed when fewer updates than rungs are left:
   the final density is always reached at the last update at or before ``end_step``);
2. back off on regret (one rung UP, raising density) when the blocks dropped at the last
   update (every dropped block: a prune's, and those swapped out at a hold or a back-off)
   carried at least ``regret_threshold`` times the mean saliency EMA of the blocks
   active before that update (0 = they carried nothing, 1 = as much as an average block):
   saliency could hardly tell them from the blocks it kept. This is measured when they are
   dropped, so it needs no settling and is acted on even during a cooldown (else a
   cooldown after every prune would hide the regret of every prune). In practice this
   undoes the first prunes of a run (Note [Regret in practice] below);
3. hold when the interval's loss was not finite on any step (``hold:nonfinite``; a
   diverging run is not pruned further, except by the deadline, rule 1; the hold does not
   count toward patience);
4. cooldown: for ``cooldown`` updates after any change, hold (lets the loss settle);
5. back off on loss when ``rel < -backoff_tol`` (the loss got worse);
6. hold while the loss gets worse and no back-off is left (never prune then; this resets
   the count of stalled holds);
7. prune (one rung down) when ``rel >= improve_tol`` (the loss keeps improving), or at the
   ``patience``-th consecutive stalled update, i.e. after ``patience - 1`` stalled holds
   (``2 * patience`` after a back-off: hysteresis; ``patience=1`` prunes at every stalled
   update); an update without a previous loss to compare with (the first) counts as stalled;
8. otherwise hold (the loss stalls inside the dead band ``[-backoff_tol, improve_tol)``).

Back-offs (2 and 5) happen at most ``max_backoffs`` times in a run, never above the top of
the ladder, and only while enough updates are left to come back down by the deadline.

Worked example (ladder 1.0, 0.5, 0.1; improve_tol 0.01, cooldown 1, smoothing 0):
losses 2.0, 1.5, 1.4, 1.39 at updates 1..4 give: update 1 hold (no previous loss),
update 2 prune to 0.5 (rel 0.25), update 3 cooldown, update 4 hold (rel 0.007) ...

Without a loss (zero-code mode) ``rel`` is unknown, so every update after a cooldown
stalls: the schedule prunes every ``patience + cooldown`` updates (every 3 with the
defaults) and still backs off on regret.

``saliency="movement"`` scores can be negative, so the regret ratio has no meaning there:
the Sparsifier gives no regret signal in that mode (``pruned_saliency`` is None).

Note [Regret in practice]
~~~~~~~~~~~~~~~~~~~~~~~~~
Block scores are sums over b x b weights, so they bunch together: the blocks a prune drops
(the lowest EMAs) carry 0.55-0.7 of the mean, and about 0.9 in early training, when the
saliency of a freshly initialized model cannot tell blocks apart (Fashion-MNIST MLP, the
audit files of the main job). With the default threshold 0.5 the rule therefore undoes the
first prunes of a run until ``max_backoffs`` are spent, even while the loss falls fast,
and after that never fires again. The effect is a delay: the model stays dense longer
while its saliency is uninformative. Its cost: each back-off regrows the dropped blocks
from zero weight, and the back-offs are gone when a later loss regression could use them.
A variant that backed off on regret only when the loss also got worse (sixteenth session)
made AGPE prune about twice as early (0.176x instead of 0.259x the training FLOPs on the
Fashion-MNIST ``--full`` setting) and lost 0.24 points of test accuracy on three seeds
(docs/benchmarks.md), so the rule stays as it is. A delay that does not throw trained
blocks away (hold until the candidates' saliency separates from the kept blocks') is an
open design question.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

from agpe_compile.layout import DEFAULT_BUCKETS, bucket_for


@dataclasses.dataclass(frozen=True)
class Feedback:
    """What the schedule observes at one update (``None`` = not available)."""

    loss: Optional[float] = None  # NaN: losses were given but none of the interval's was finite
    pruned_saliency: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class AdaptiveState:
    """The schedule's state: a value, replaced (never mutated) at each update."""

    rung: int = 0
    smoothed_loss: Optional[float] = None
    cooldown_left: int = 0
    holds: int = 0
    backoffs: int = 0
    backed_off: bool = False
    event: str = "start"


@dataclasses.dataclass(frozen=True)
class AdaptiveSchedule:
    """Feedback-driven target density; see Note [Adaptive schedule].

    Example::

        >>> sched = AdaptiveSchedule(1.0, 0.1, end_step=1000, update_interval=10)
        >>> sched.ladder
        (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1)
        >>> s = sched.next_state(sched.initial_state(), 10, Feedback(loss=2.0))
        >>> s = sched.next_state(s, 20, Feedback(loss=1.0))
        >>> s.event, sched.density(s)
        ('prune:improving', 0.75)
    """

    initial_density: float
    final_density: float
    end_step: int
    update_interval: int
    max_density: Optional[float] = None
    buckets: Tuple[float, ...] = DEFAULT_BUCKETS
    improve_tol: float = 0.01
    backoff_tol: float = 0.05
    regret_threshold: float = 0.5
    patience: int = 2
    cooldown: int = 1
    max_backoffs: int = 2
    loss_smoothing: float = 0.5

    @property
    def ladder(self) -> Tuple[float, ...]:
        top = max(self.initial_density, self.max_density or self.initial_density)
        floor_bucket = bucket_for(self.final_density, self.buckets)
        rungs = {top, self.initial_density, self.final_density}
        rungs.update(b for b in self.buckets if floor_bucket < b < top)
        return tuple(sorted(rungs, reverse=True))

    def initial_state(self) -> AdaptiveState:
        return AdaptiveState(rung=self.ladder.index(self.initial_density))

    def density(self, state: AdaptiveState) -> float:
        return self.ladder[state.rung]

    def next_state(self, state: AdaptiveState, step: int, feedback: Feedback) -> AdaptiveState:
        """The state after the update at ``step``; ``.event`` says what happened and why."""
        last = len(self.ladder) - 1
        smoothed, rel = self._smooth(state.smoothed_loss, feedback.loss)
        hold = dataclasses.replace(state, smoothed_loss=smoothed)
        updates_left = max((self.end_step - step) // self.update_interval + 1, 1)
        if state.rung < last and last - state.rung >= updates_left:
            # one rung per update left; the excess at once when the window is too short
            return self._move(hold, last - state.rung - updates_left + 1, "prune:deadline")
        # A back-off must leave enough updates to walk back down by end_step.
        can_back_off = state.rung > 0 and state.backoffs < self.max_backoffs and last - state.rung + 1 < updates_left
        regret = feedback.pruned_saliency is not None and feedback.pruned_saliency >= self.regret_threshold
        if regret and can_back_off:
            return self._back_off(hold, "backoff:regret")
        if feedback.loss is not None and not math.isfinite(feedback.loss):
            return dataclasses.replace(hold, cooldown_left=max(state.cooldown_left - 1, 0), event="hold:nonfinite")
        if state.cooldown_left > 0:
            return dataclasses.replace(hold, cooldown_left=state.cooldown_left - 1, event="hold:cooldown")
        worse = rel is not None and rel < -self.backoff_tol
        if worse and can_back_off:
            return self._back_off(hold, "backoff:loss")
        if worse:
            return dataclasses.replace(hold, holds=0, event="hold:worse")
        if state.rung < last and rel is not None and rel >= self.improve_tol:
            return dataclasses.replace(self._move(hold, +1, "prune:improving"), backed_off=False)
        patience = 2 * self.patience if state.backed_off else self.patience
        if state.rung < last and state.holds + 1 >= patience:
            return self._move(hold, +1, "prune:patience")
        return dataclasses.replace(hold, holds=state.holds + 1, event="hold:stall" if state.rung < last else "hold:final")

    def _smooth(self, previous: Optional[float], loss: Optional[float]):
        if loss is None or not math.isfinite(loss):
            return previous, None
        if previous is None:
            return loss, None
        smoothed = self.loss_smoothing * previous + (1.0 - self.loss_smoothing) * loss
        return smoothed, (previous - smoothed) / max(abs(previous), 1e-12)

    def _back_off(self, state: AdaptiveState, event: str) -> AdaptiveState:
        moved = self._move(state, -1, event)
        return dataclasses.replace(moved, backoffs=state.backoffs + 1, backed_off=True)

    def _move(self, state: AdaptiveState, direction: int, event: str) -> AdaptiveState:
        return dataclasses.replace(state, rung=state.rung + direction, cooldown_left=self.cooldown,
                                   holds=0, event=event)

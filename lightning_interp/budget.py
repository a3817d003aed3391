"""``OverheadBudget``: keep a callback's analyses within a share of the fit's wall time.

A fixed schedule costs a fixed time per analysis, whatever the training costs: every 10 epochs is nothing on a
model that trains for hours and a third of the time on one that trains in seconds. With a budget, an analysis that
comes due is postponed while running it would lift the callback's share of the fit's wall time above the budget,
and runs at the first epoch end where it fits (decided at the epoch's start, counting the coming epoch at the fit's
average epoch length). The cost of the next analysis is taken to be the last one's, so the
first analysis always runs (nothing is known of its cost before).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def check_max_overhead(value: object) -> None:
    """Fail at construction on a budget that is not a share in (0, 1] or ``None``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"max_overhead must be a share of the fit's wall time in (0, 1] (0.05 = 5%) or None, "
                         f"got {value!r}")


def within_budget(spent: float, expected: float, elapsed: float, share: float) -> bool:
    """Whether one more analysis of ``expected`` seconds keeps ``spent`` (the analyses so far) within ``share`` of
    the fit's wall time, which the analysis itself lengthens: ``spent + expected <= share * (elapsed + expected)``."""
    return spent + expected <= share * (elapsed + expected)


@dataclass
class OverheadBudget:
    """The schedule's decisions under a budget of ``share`` of the fit's wall time, one per epoch.

    ``decide`` is called once at the start of every epoch (on every rank, which must agree: the caller decides on
    rank zero and broadcasts); ``due`` answers for that epoch afterwards, as often as asked.
    """

    share: float
    postponed: int = 0  # scheduled analyses postponed in this fit
    pending: bool = False  # one postponed analysis waits for the budget
    _decisions: dict[int, bool] = field(default_factory=dict)

    def reset(self, pending: bool = False) -> None:
        """A new fit: no postponements yet; ``pending`` carries one over from the checkpoint it resumes."""
        self.postponed, self.pending = 0, pending
        self._decisions.clear()

    def wants(self, scheduled: bool) -> bool:
        """Whether an analysis would run this epoch if the budget allowed (it is scheduled, or one waits)."""
        return scheduled or self.pending

    def decide(self, epoch: int, scheduled: bool, allowed: bool) -> bool:
        """Record whether the analysis of ``epoch`` runs; returns ``True`` when a scheduled one was just postponed."""
        runs = self.wants(scheduled) and allowed
        self._decisions[epoch] = runs
        newly_postponed = scheduled and not allowed
        if newly_postponed:
            self.postponed += 1
        self.pending = self.wants(scheduled) and not allowed
        return newly_postponed

    def note_postponed(self) -> None:
        """An analysis due on another trigger (a checkpoint) was postponed; that trigger comes again by itself."""
        self.postponed += 1

    def due(self, epoch: int, scheduled: bool) -> bool:
        """Whether an analysis runs at the end of ``epoch``; where no decision was made (outside a fit, or the epoch a
        fit resumed in the middle of), the schedule or a waiting analysis."""
        return self._decisions.get(epoch, scheduled or self.pending)

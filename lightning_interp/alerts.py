"""Alerts: a record of what crossed a threshold, and what to do about it (warn, stop training, or raise)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

ALERT_ACTIONS = ("warn", "stop", "raise")
AlertAction = Literal["warn", "stop", "raise"]


@dataclass(frozen=True)
class Alert:
    """One threshold crossing: which callback saw which metric take which value, when, and why it matters."""

    source: str
    metric: str
    value: float
    threshold: float
    epoch: int
    step: int
    message: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Alert:
        return cls(**data)

    def __str__(self) -> str:
        return (
            f"[{self.source}] epoch {self.epoch}, step {self.step}: {self.metric} = {self.value:.4g} "
            f"(threshold {self.threshold:.4g}). {self.message}"
        )


class InterpretationAlert(RuntimeError):
    """Raised for an alert when the callback's ``alert_action`` is ``"raise"``."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(str(alert))
        self.alert = alert


class InterpretationWarning(UserWarning):
    """Category of every warning lightning_interp emits, so users can filter them in one line."""


def validate_action(action: str) -> str:
    if action not in ALERT_ACTIONS:
        raise ValueError(f"alert_action must be one of {ALERT_ACTIONS}, got {action!r}")
    return action


class AlertPolicy:
    """What happens when an alert fires.

    Every user hook is called first with the :class:`Alert`, on global rank zero only (one Slack message, not
    one per GPU; every rank sees the same alert). A hook that raises is recorded in ``hook_errors`` and reported
    in one warning per hook and error type instead of propagating: an exception on rank zero alone would leave
    the other ranks waiting in the analysis' next collective (the callback re-raises it on every rank under
    ``strict=True``). Then ``"warn"`` emits one
    :class:`InterpretationWarning`; ``"stop"`` warns and asks the trainer to stop at the end of the epoch (the
    decision is reduced over ranks by the callback, as ``EarlyStopping`` does); ``"raise"`` raises
    :class:`InterpretationAlert`.
    """

    def __init__(self, action: AlertAction = "warn", hooks: Sequence[Callable[[Alert], None]] = ()) -> None:
        self.action = validate_action(action)
        self.hooks = list(hooks)
        self.stop_requested = False
        self.hook_errors: list[Exception] = []
        self._reported: set[tuple[str, str]] = set()

    def apply(self, alert: Alert, *, is_global_zero: bool = True) -> None:
        if is_global_zero:
            for hook in self.hooks:
                try:
                    hook(alert)
                except Exception as err:
                    self.hook_errors.append(err)
                    name = getattr(hook, "__qualname__", None) or repr(hook)
                    if (name, type(err).__name__) not in self._reported:
                        self._reported.add((name, type(err).__name__))
                        warnings.warn(f"alert hook {name} failed on {alert.metric}: {type(err).__name__}: {err}. "
                                      "The alert is still recorded and logged; later failures of this hook with the "
                                      "same error are not reported again", InterpretationWarning, stacklevel=3)
        if self.action == "raise":
            raise InterpretationAlert(alert)
        if is_global_zero:
            warnings.warn(str(alert), InterpretationWarning, stacklevel=3)
        if self.action == "stop":
            self.stop_requested = True

r"""Exceptions raised by torchconstrain, and how it warns."""

from __future__ import annotations

import sys
import warnings

__all__ = ["CheckpointMismatch", "ConstraintViolation"]


def warn_at_caller(message: str) -> None:
    r"""``warnings.warn(message)`` at the first frame outside torchconstrain and torch: the
    user's line (``constrain(...)``, ``model(x)``) that led to it, which the warning shows
    and which Python's filters count once."""
    frame, level = sys._getframe(1), 2  # (1 would be this function)
    while frame is not None and (frame.f_globals.get("__name__") or "").partition(".")[0] in ("torchconstrain", "torch"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


class ConstraintViolation(ValueError):
    r"""Raised by :func:`torchconstrain.check` when effective tensors break their constraints.

    Attributes:
        violations: ``(fqn, reason)`` pairs, one per broken constraint.
    """

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = violations
        tensors = sorted({fqn for fqn, _ in violations})
        lines = [f"{len(tensors)} tensor(s) break their constraints:"]
        lines += [f"  {fqn}: {reason}" for fqn, reason in violations]
        super().__init__("\n".join(lines))


class CheckpointMismatch(ValueError, RuntimeError):
    r"""Raised by ``load_state_dict`` on a constrained model when a checkpoint does not fit it.

    Shapes, mask values, bounds and constraint state are checked for the whole model before
    anything is copied, so the model is unchanged. It is a ``RuntimeError`` too, like the
    errors ``load_state_dict`` raises itself.

    Attributes:
        problems: one line per tensor that does not fit, starting with its name.
    """

    def __init__(self, problems: list[str], *, loaded: bool | None = None) -> None:
        self.problems = problems
        lines = [f"load_state_dict: {len(problems)} tensor(s) of the checkpoint do not fit the model."]
        if loaded is False:
            lines[0] += " Nothing was loaded."
        lines += [f"  {problem}" for problem in problems]
        super().__init__("\n".join(lines))

r"""Exceptions raised by torchconstrain."""

from __future__ import annotations

__all__ = ["ConstraintViolation"]


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

r"""Schedules that change constraints while training: gradual pruning, temperature annealing.

Both work like torch's learning-rate schedulers: construct one after :func:`constrain`
(it applies the value for step 0), call :meth:`step` once per training step, and save
:meth:`state_dict` next to the model's to resume. The constraints' own state (masks,
temperatures) lives in the model's ``state_dict``; the schedule's holds its position.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchconstrain._tensors import Slot, parameter_slots
from torchconstrain.constraints.arguments import choice, integer, number
from torchconstrain.constraints.masks import FixedMask, LearnableMask, _temperature_problem
from torchconstrain.constraints.selection import (
    NM,
    GlobalMagnitude,
    Magnitude,
    RandomSelection,
    Structured,
    _check_sparsity,
    _keep_largest,
)
from torchconstrain.keys import match
from torchconstrain.rules import refuse_contradictions

__all__ = ["PruningSchedule", "TemperatureSchedule"]


class _Schedule:
    """Step counting and checkpointing shared by the schedules."""

    _settings: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.last_step = 0

    def step(self) -> None:
        r"""Advance one training step and apply that step's value (neither, if that raises)."""
        self._refuse_gone_targets()
        self.last_step += 1
        try:
            self._apply()
        except Exception:
            self.last_step -= 1
            raise

    def _refuse_gone_targets(self) -> None:
        """Refuse to go on driving constraints that are no longer on their tensors (baked,
        shrunk, removed): each step would change nothing while the schedule said it did."""
        gone = [slot.fqn for slot, constraint in self.targets if all(c is not constraint for c in slot.constraints())]
        if gone:
            kind = type(self.targets[0][1]).__name__
            raise ValueError(
                f"{type(self).__name__}: the {kind} of {', '.join(gone)} is no longer in the model (baked, "
                "shrunk or removed), so stepping would change nothing. Build a new schedule for the model as it is."
            )

    def state_dict(self) -> dict:
        r"""The position and settings of the schedule (the constraints' state is the model's)."""
        return {"last_step": self.last_step, **{name: getattr(self, name) for name in self._settings}}

    def load_state_dict(self, state: dict) -> None:
        r"""Resume from :meth:`state_dict`; the model's own ``state_dict`` holds the masks.
        Its settings are checked as the constructor checks them, all before any is set."""
        where = f"{type(self).__name__}.load_state_dict"
        missing = {"last_step", *self._settings} - set(state)
        if missing:
            raise ValueError(f"{where}: missing keys {sorted(missing)}.")
        last_step = integer(where, "last_step", state["last_step"], low=0)
        previous = self.state_dict()
        self._configure(**{name: state[name] for name in self._settings})
        self.last_step = last_step
        try:
            self._resumed()
        except Exception:
            self._configure(**{name: previous[name] for name in self._settings})
            self.last_step = previous["last_step"]
            raise

    def _resumed(self) -> None:
        """After :meth:`load_state_dict`: apply what the restored step needs applied now."""

    def _configure(self, **settings) -> None:
        """Check ``settings`` (those named in ``_settings``) and set them, all or none."""
        raise NotImplementedError

    def _apply(self) -> None:
        raise NotImplementedError


def _targets(model: nn.Module, key, kind: type, schedule: str) -> list[tuple[Slot, nn.Module]]:
    """The tensors ``key`` picks (all by default) with their first constraint of ``kind``."""
    slots = parameter_slots(model)
    names = list(slots) if key is None else match(model, key)
    found = []
    for fqn in names:
        first = next((c for c in slots[fqn].constraints() if isinstance(c, kind)), None)
        if first is not None and all(first is not other for _, other in found):  # a tied tensor once
            found.append((slots[fqn], first))
    if not found:
        where = "in the model" if key is None else f"among the tensors {key!r} picks ({len(names)})"
        raise ValueError(f"{schedule}: no tensor with a {kind.__name__} {where}. Constrain the model first.")
    return found


class PruningSchedule(_Schedule):
    r"""Raise the sparsity of :class:`~torchconstrain.FixedMask` masks with Zhu & Gupta's cubic schedule.

    At step ``t`` the target sparsity is
    ``s_t = final + (initial - final) * (1 - (t - start) / (end - start)) ** 3``
    for ``start <= t <= end`` (``initial`` before, ``final`` after). Every ``every``
    steps in that window, and at ``end``, each target's mask is recomputed by magnitude
    of its effective tensor (``scope="tensor"``) or with one threshold across all targets
    (``scope="global"``), entry by entry, or by the norms of whole slices for masks that
    :meth:`FixedMask.structured` chose (``scope="tensor"``). Masks only grow: an entry once
    masked stays masked, so a mask that starts sparser than the schedule keeps its sparsity
    until the schedule passes it; masked entries count towards each target, so a mask then
    masks exactly its share (ties among zeros, such as the tensor's own exact zeros, never
    push it past).

    Args:
        model: a model constrained with FixedMask templates on the tensors to prune, for
            example ``FixedMask.magnitude(sparsity=0.0)``.
        final_sparsity: the sparsity reached at ``end``, in [0, 1).
        end: the step at which the final sparsity is reached.
        start: the first step of pruning.
        every: prune every ``every`` steps.
        initial_sparsity: the sparsity at ``start``.
        scope: ``"tensor"`` or ``"global"``.
        key: a rule key picking the tensors to prune (default: every tensor with a FixedMask).

    Raises:
        ValueError: bad settings, no tensor with a FixedMask to drive, a mask it cannot grow
            as it was chosen (an N:M pattern, surgery's channel masks, a structured mask
            under ``scope="global"``), or a stack that a grown mask could break (a
            ``UnitNorm`` after the mask needs every slice to keep an entry, which the mask
            as applied did but a grown one need not). :meth:`step` raises it once the masks
            it drives are no longer in the model (baked, shrunk).

    Example:
        >>> from torch import nn
        >>> from torchconstrain import FixedMask, PruningSchedule, constrain
        >>> model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
        >>> _ = constrain(model, {nn.Linear: FixedMask.magnitude(sparsity=0.0)})
        >>> schedule = PruningSchedule(model, final_sparsity=0.8, end=10, every=2)
        >>> for _ in range(10):
        ...     schedule.step()  # after each optimizer.step()
        >>> round((model[0].weight == 0).float().mean().item(), 2)
        0.8
    """

    _settings = ("final_sparsity", "initial_sparsity", "start", "end", "every", "scope")

    def __init__(self, model: nn.Module, *, final_sparsity: float, end: int, start: int = 0,
                 every: int = 1, initial_sparsity: float = 0.0, scope: str = "tensor", key=None) -> None:
        super().__init__()
        self._configure(final_sparsity=final_sparsity, initial_sparsity=initial_sparsity, start=start,
                        end=end, every=every, scope=scope)
        self.targets = _targets(model, key, FixedMask, "PruningSchedule")
        self.slices = self._growth()
        for slot, mask in self.targets:
            _refuse_stacks_a_grown_mask_breaks(slot, mask)
        self._apply()

    def _configure(self, *, final_sparsity, initial_sparsity, start, end, every, scope) -> None:
        final = _check_sparsity(final_sparsity, "PruningSchedule final_sparsity")
        initial = _check_sparsity(initial_sparsity, "PruningSchedule initial_sparsity")
        if initial > final:
            raise ValueError(
                f"PruningSchedule: expected initial_sparsity <= final_sparsity (masks only grow). "
                f"Got initial_sparsity={initial!r}, final_sparsity={final!r}."
            )
        start, end = integer("PruningSchedule", "start", start), integer("PruningSchedule", "end", end)
        if not 0 <= start < end:
            raise ValueError(f"PruningSchedule: expected integers 0 <= start < end. Got start={start!r}, end={end!r}.")
        every = integer("PruningSchedule", "every", every, low=1)
        scope = choice("PruningSchedule", "scope", scope, ("tensor", "global"))
        self.final_sparsity, self.initial_sparsity, self.start, self.end = final, initial, start, end
        self.every, self.scope = every, scope

    def _growth(self) -> dict[str, Structured | None]:
        """How each target's mask grows under this scope (see :func:`_slices_grown`)."""
        return {slot.fqn: _slices_grown(slot.fqn, mask, self.scope) for slot, mask in self.targets}

    def _resumed(self) -> None:
        self.slices = self._growth()  # the restored scope may not grow them

    def sparsity(self, step: int | None = None) -> float:
        r"""The target sparsity at ``step`` (default: the current step)."""
        step = self.last_step if step is None else step
        progress = min(max((step - self.start) / (self.end - self.start), 0.0), 1.0)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    def _apply(self) -> None:
        step = self.last_step
        due = step == self.end or (self.start <= step < self.end and (step - self.start) % self.every == 0)
        if not due:
            return
        scores = {slot.fqn: _scores_masked_last(slot.value(), mask, self.slices[slot.fqn])
                  for slot, mask in self.targets}
        if self.scope == "global":
            keeps = GlobalMagnitude(sparsity=self.sparsity()).keep_largest(scores)
        else:
            keeps = {fqn: _keep_largest(score, self.sparsity()) for fqn, score in scores.items()}
        with torch.no_grad():
            for slot, mask in self.targets:
                mask.mask.logical_and_(keeps[slot.fqn])  # (a slice's keep broadcasts over its entries)


def _slices_grown(fqn: str, mask: FixedMask, scope: str) -> Structured | None:
    """How a schedule grows ``mask`` so that it stays what chose it: entry by entry (``None``:
    masks chosen by magnitude, at random or given), or by whole slices (the ``structured``
    template that chose it); a ValueError for the masks it cannot grow alike."""
    chosen = getattr(mask, "chosen_by", None)  # (a FixedMask pickled before it had one)
    if chosen is None or isinstance(chosen, (Magnitude, GlobalMagnitude, RandomSelection)):
        return None
    if isinstance(chosen, Structured) and scope == "tensor":
        dim = chosen.dim % mask.mask.dim() if mask.mask.dim() else 0
        others = [d for d in range(mask.mask.dim()) if d != dim]
        if others and not torch.equal(mask.mask, mask.mask.all(dim=others, keepdim=True).expand_as(mask.mask)):
            raise ValueError(f"PruningSchedule: {fqn}: its FixedMask was chosen by {chosen}, but it no longer "
                             f"masks whole slices along dim {dim} (replaced since?), so it cannot grow by slices.")
        return chosen
    why = {
        Structured: "its slices are ranked by their own norms, tensor by tensor: pass scope='tensor'",
        NM: "an N:M pattern keeps n of every m entries, a sparsity no schedule can raise",
    }.get(type(chosen), "its channels are masked in every layer of their group together, which a schedule "
                        "growing one tensor's mask would not keep (raise the group's sparsity with "
                        "surgery.mask_blocks or surgery.graph.mask_groups, or train learnable budgets)")
    raise ValueError(f"PruningSchedule: {fqn}: its FixedMask was chosen by {chosen}; a grown mask would not "
                     f"be: {why}.")


def _scores_masked_last(value: torch.Tensor, mask: FixedMask, slices: Structured | None) -> torch.Tensor:
    """What a grown mask keeps the largest of: ``|value|`` per entry, or with ``slices`` each
    slice's norm (kept broadcastable against ``value``), with what ``mask`` masks ranked
    below everything else: masked values are zeros like the tensor's own exact zeros, and
    ranked as their equals a new mask could keep a masked entry (which stays masked) and
    prune a live one in its place."""
    value = value.detach()
    if slices is None:
        return torch.where(mask.mask, value.abs(), -1)
    others = [d for d in range(value.dim()) if d != slices.dim % value.dim()]
    if not others or not value.numel():  # (no inf norm of nothing)
        return torch.where(mask.mask, value.abs(), -1)
    norms = torch.linalg.vector_norm(value, ord=slices.p, dim=others, keepdim=True,
                                     dtype=torch.promote_types(value.dtype, torch.float32))
    return torch.where(mask.mask.any(dim=others, keepdim=True), norms, -1)


def _refuse_stacks_a_grown_mask_breaks(slot: Slot, mask: FixedMask) -> None:
    """Refuse a stack that holds with ``mask`` as it is but not with any mask it may grow
    into (one that empties a slice a ``UnitNorm`` after it normalizes): checked as if the
    mask kept nothing, which declares only what every mask does."""
    chain = slot.constraints()
    declared = [(FixedMask(torch.zeros_like(c.mask)) if c is mask else c).with_values().stacking() for c in chain]
    labels = ["PruningSchedule, which grows it" if c is mask else "constrain" for c in chain]
    try:
        refuse_contradictions(slot.fqn, chain, labels, mask.mask.shape, declared)
    except ValueError as error:
        raise ValueError(f"PruningSchedule: {error}") from None


def _temperature(name: str, value) -> float:
    """A temperature the masks' float32 buffers hold as a finite number > 0 (so every one
    on the way between two of them is too)."""
    value = number("TemperatureSchedule", name, value, low=0, low_open=True)
    stored = torch.tensor(value).item()
    if not (0 < stored < math.inf):
        raise ValueError(
            f"TemperatureSchedule: expected {name} to be a finite number > 0 in float32 (the "
            f"masks' temperature buffers). Got {value!r}, which is {stored:g} there."
        )
    return value


class TemperatureSchedule(_Schedule):
    r"""Anneal the temperature of :class:`~torchconstrain.LearnableMask` gates geometrically.

    At step ``t`` the temperature is ``initial * (final / initial) ** min(t / steps, 1)``:
    a falling temperature sharpens ``sigmoid(scores / temperature)`` towards a binary gate.

    Args:
        model: a model constrained with LearnableMask templates.
        final_temperature: the temperature reached after ``steps`` steps, > 0.
        steps: the length of the annealing.
        initial_temperature: the temperature at step 0, > 0 (default: the masks' own, which
            must then be one temperature; a ``LearnableMask``'s default is 1).
        key: a rule key picking the masks' tensors (default: every tensor with a LearnableMask).

    Example:
        >>> from torch import nn
        >>> from torchconstrain import LearnableMask, TemperatureSchedule, constrain
        >>> model = nn.Linear(4, 4)
        >>> _ = constrain(model, {"weight": LearnableMask()})
        >>> schedule = TemperatureSchedule(model, final_temperature=0.1, steps=2)
        >>> schedule.step()
        >>> round(model.parametrizations.weight[0].temperature.item(), 4)
        0.3162
    """

    _settings = ("initial_temperature", "final_temperature", "steps")

    def __init__(self, model: nn.Module, *, final_temperature: float, steps: int,
                 initial_temperature: float | None = None, key=None) -> None:
        super().__init__()
        targets = _targets(model, key, LearnableMask, "TemperatureSchedule")
        if initial_temperature is None:
            initial_temperature = _one_temperature(targets)
        self._configure(initial_temperature=initial_temperature, final_temperature=final_temperature, steps=steps)
        self.targets = targets
        self._apply()

    def _configure(self, *, initial_temperature, final_temperature, steps) -> None:
        initial = _temperature("initial_temperature", initial_temperature)
        final = _temperature("final_temperature", final_temperature)
        steps = integer("TemperatureSchedule", "steps", steps, low=1)
        self.initial_temperature, self.final_temperature, self.steps = initial, final, steps

    def temperature(self, step: int | None = None) -> float:
        r"""The temperature at ``step`` (default: the current step)."""
        step = self.last_step if step is None else step
        ratio = self.final_temperature / self.initial_temperature
        return self.initial_temperature * math.pow(ratio, min(step / self.steps, 1.0))

    def _resumed(self) -> None:
        self._apply()  # the masks' temperature of the restored step

    def _apply(self) -> None:
        value = self.temperature()
        for slot, mask in self.targets:  # all checked before any is set
            _refuse_unheld_temperature(slot.fqn, mask.temperature, value, self.last_step)
        with torch.no_grad():
            for _, mask in self.targets:
                mask.temperature.fill_(value)


def _one_temperature(targets) -> float:
    """The temperature every mask of ``targets`` has (a default ``initial_temperature``)."""
    if any(mask.temperature.is_meta for _, mask in targets):
        raise ValueError("TemperatureSchedule: the masks are on the meta device, so their temperature is unknown. "
                         "Pass initial_temperature=.")
    found = {float(mask.temperature): slot.fqn for slot, mask in targets}
    if len(found) > 1:
        seen = ", ".join(f"{fqn} {value:g}" for value, fqn in found.items())
        raise ValueError(f"TemperatureSchedule: the masks have different temperatures ({seen}). Expected one "
                         "temperature to start from: pass initial_temperature=.")
    return next(iter(found))


def _refuse_unheld_temperature(fqn: str, buffer: torch.Tensor, value: float, step: int) -> None:
    """Refuse a temperature ``buffer`` (float32 unless the model was cast after
    :func:`constrain`) would hold as 0 or infinity: its gates would be NaN."""
    stored = torch.tensor(value, dtype=buffer.dtype)
    if _temperature_problem(stored):
        raise ValueError(
            f"TemperatureSchedule: {fqn}: the temperature of step {step}, {value:g}, is "
            f"{stored.item():g} in {buffer.dtype} (its LearnableMask's temperature buffer), which "
            "would make NaN gates. Expected a final_temperature that dtype holds, or keep the "
            "model in float32 and use torch.autocast for low-precision compute."
        )

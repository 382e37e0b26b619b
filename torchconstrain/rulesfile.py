r"""Rules written in YAML or JSON files, for :func:`constrain` and the command line.

A rules file is a mapping with a ``rules`` list and an optional ``blocks`` mapping::

    rules:
      - match: features.0.0                      # a name, glob or "re:" regex, as in Python
        apply: {Clamp: {min: -1.0, max: 1.0}}
      - match: {type: Linear}                    # every torch.nn.Linear's weight
        apply: [NonNeg, {MaxNorm: {max_value: 2.0}}]
      - match: {role: depthwise}                 # a surgery role (torchconstrain.surgery.role)
        apply: {FixedMask.magnitude: {sparsity: 0.5}}
      - match: classifier.3
        apply: null                              # exclude from every other rule
    blocks:                                      # optional: surgery.mask_blocks options
      learnable: true
      strength: 0.05

``blocks`` takes :func:`~torchconstrain.surgery.mask_blocks`'s options, and ``input_shape``
(``[1, 3, 32, 32]``), the input a ``macs`` budget is counted for (its ``example``).
``apply`` names constraints from :data:`CONSTRAINTS`, each with its keyword arguments
(or none: ``NonNeg`` alone), or a list of them, or ``null``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from torchconstrain.constraints import (
    L1,
    L2,
    Clamp,
    FakeQuant,
    FixedMask,
    LearnableMask,
    MaxNorm,
    NonNeg,
    UnitNorm,
)
from torchconstrain.surgery import block_rules, role

__all__ = ["CONSTRAINTS", "RulesFile", "RulesFileError", "read_rules"]

#: Constraint names usable in rules files.
CONSTRAINTS = {
    "Clamp": Clamp,
    "NonNeg": NonNeg,
    "MaxNorm": MaxNorm,
    "UnitNorm": UnitNorm,
    "FakeQuant": FakeQuant,
    "FakeQuant.xnnpack": FakeQuant.xnnpack,
    "LearnableMask": LearnableMask,
    "FixedMask.magnitude": FixedMask.magnitude,
    "FixedMask.global_magnitude": FixedMask.global_magnitude,
    "FixedMask.random": FixedMask.random,
    "FixedMask.structured": FixedMask.structured,
    "FixedMask.n_m": FixedMask.n_m,
    "L1": L1,
    "L2": L2,
}
BLOCK_OPTIONS = ("groups", "sparsity", "macs", "learnable", "importance", "strength", "hard", "rate", "minimum",
                 "input_shape")


class RulesFileError(ValueError):
    r"""A rules file that cannot be read: the message names the file, the rule and, for YAML, the line."""


@dataclass
class RulesFile:
    r"""A parsed rules file: ``(key, value)`` rules and ``surgery.mask_blocks`` options."""

    path: str
    rules: list[tuple[object, object]]
    blocks: dict | None = None
    lines: list[int | None] = field(default_factory=list)

    def to_rules(self, model: nn.Module):
        r"""Return ``(rules, finish)`` for ``model``: the file's rules with role keys resolved
        and the block masks appended; call ``finish()`` after :func:`constrain` applied them."""
        rules = [(self._key(model, key, index), value) for index, (key, value) in enumerate(self.rules)]
        if self.blocks is None:
            return rules, lambda: None
        options = dict(self.blocks)
        if "input_shape" in options:  # the input a MAC budget is counted for
            options["example"] = torch.zeros(options.pop("input_shape"))
        try:
            extra, finish = block_rules(model, **options)
        except (TypeError, ValueError) as error:  # an option of the wrong type or value
            raise RulesFileError(f"{self.path}, blocks: {error}") from None
        return rules + extra, finish

    def rule_name(self, index: int) -> str:
        r"""How messages name rule ``index`` of :meth:`to_rules`: :meth:`where` it is written, or
        ``"rules.yaml, blocks"`` for the block masks that follow the file's own rules."""
        return self.where(index) if index < len(self.rules) else f"{self.path}, blocks"

    def _key(self, model: nn.Module, key, index: int):
        if not (isinstance(key, tuple) and key[0] == "role"):
            return key
        try:
            return role(model, key[1])
        except ValueError as error:
            raise RulesFileError(f"{self.where(index)}: {error}") from None

    def where(self, index: int) -> str:
        r"""``"rules.yaml, rule 2 (line 7)"``: where rule ``index`` is written."""
        line = self.lines[index] if index < len(self.lines) else None
        return f"{self.path}, rule {index}" + (f" (line {line})" if line else "")


def read_rules(path: str | os.PathLike) -> RulesFile:
    r"""Read and validate a YAML (``.yaml``/``.yml``) or JSON (``.json``) rules file.

    Every constraint is built here, so a bad name or argument is reported with its place
    in the file before any model is touched.

    Raises:
        RulesFileError: the file is missing or malformed, or names an unknown constraint,
            module type or option, or gives a constraint bad arguments.

    Example:
        >>> import pathlib, tempfile
        >>> from torchconstrain.rulesfile import read_rules
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "rules.yaml"
        >>> _ = path.write_text("rules:\n  - match: '*.weight'\n    apply: {Clamp: {min: -1, max: 1}}\n")
        >>> read_rules(path).rules
        [('*.weight', Clamp(min=-1, max=1))]
    """
    path = Path(path)
    if not path.is_file():
        raise RulesFileError(f"{path}: no such rules file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RulesFileError(f"{path}: not UTF-8 text ({error}). Save the rules file as UTF-8.") from None
    if path.suffix in (".yaml", ".yml"):
        document, lines = _load_yaml(path, text)
    elif path.suffix == ".json":
        document, lines = _load_json(path, text), []
    else:
        raise RulesFileError(f"{path}: expected a .yaml, .yml or .json rules file. Got {path.suffix or 'no suffix'}.")
    return _parse(str(path), document, lines)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, reading ``1e-2`` and ``2e3`` as numbers, as YAML 1.2 and JSON
    do (YAML 1.1 wants a dot, ``1.0e-2``, and reads them as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(path: Path, text: str) -> tuple[object, list[int]]:
    try:
        root = yaml.compose(text, Loader=_Loader)
        document = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise RulesFileError(f"{path}: not valid YAML: {error}") from None
    _refuse_duplicate_yaml_keys(path, root)
    return document, _rule_lines(root)


def _refuse_duplicate_yaml_keys(path: Path, node, visited: set[int] | None = None) -> None:
    """Raise on a key given twice in one mapping (YAML keeps the last one silently). Each
    node once: an alias can make the node graph cyclic (``&a [*a]``)."""
    visited = set() if visited is None else visited
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key in (key for key, _ in node.value if isinstance(key, yaml.ScalarNode)):
            if key.value in seen:
                raise RulesFileError(f"{path}, line {key.start_mark.line + 1}: the key {key.value!r} is given twice.")
            seen.add(key.value)
    for child in _children(node):
        _refuse_duplicate_yaml_keys(path, child, visited)


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _rule_lines(root) -> list[int]:
    """The 1-based line of each item of the top-level ``rules`` sequence."""
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "rules" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def _load_json(path: Path, text: str) -> object:
    def refuse_duplicates(pairs: list) -> dict:
        keys = [key for key, _ in pairs]
        twice = sorted({key for key in keys if keys.count(key) > 1})
        if twice:
            raise RulesFileError(f"{path}: the key {twice[0]!r} is given twice in one object.")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=refuse_duplicates)
    except json.JSONDecodeError as error:
        raise RulesFileError(f"{path}: not valid JSON: {error}") from None


def _parse(path: str, document, lines: list[int]) -> RulesFile:
    if not isinstance(document, dict):
        raise RulesFileError(f"{path}: expected a mapping with a 'rules' list. Got {type(document).__name__}.")
    if not isinstance(document.get("rules"), list):
        got = "no 'rules'" if "rules" not in document else f"'rules' as {type(document['rules']).__name__}"
        raise RulesFileError(f"{path}: expected a mapping with a 'rules' list. Got {got}.")
    unknown = set(document) - {"rules", "blocks"}
    if unknown:
        raise RulesFileError(f"{path}: unknown top-level keys {_sorted(unknown)}. Expected 'rules' and 'blocks'.")
    parsed = RulesFile(path, [], _blocks(path, document.get("blocks")), lines)
    for index, rule in enumerate(document["rules"]):
        parsed.rules.append(_rule(parsed.where(index), rule))
    return parsed


def _blocks(path: str, blocks) -> dict | None:
    if blocks is None:
        return None
    if not isinstance(blocks, dict):
        raise RulesFileError(f"{path}, blocks: expected a mapping of surgery.mask_blocks options. Got {blocks!r}.")
    unknown = set(blocks) - set(BLOCK_OPTIONS)
    if unknown:
        raise RulesFileError(f"{path}, blocks: unknown options {_sorted(unknown)}. Expected some of {', '.join(BLOCK_OPTIONS)}.")
    shape = blocks.get("input_shape", [1])
    if not isinstance(shape, list) or not shape or not all(type(size) is int and size >= 1 for size in shape):
        raise RulesFileError(f"{path}, blocks: expected input_shape as a list of sizes >= 1, batch included, like "
                             f"[1, 3, 224, 224]. Got {shape!r}.")
    return dict(blocks)


def _sorted(keys) -> list:
    """``keys`` sorted, whatever their types (YAML keys may be numbers next to strings)."""
    return sorted(keys, key=lambda key: (type(key).__name__, repr(key)))


def _rule(where: str, rule) -> tuple[object, object]:
    if not isinstance(rule, dict) or set(rule) != {"match", "apply"}:
        got = _sorted(rule) if isinstance(rule, dict) else repr(rule)
        raise RulesFileError(f"{where}: expected a mapping with 'match' and 'apply'. Got {got}.")
    return _match(where, rule["match"]), _apply(where, rule["apply"])


def _match(where: str, match):
    if isinstance(match, str):
        return match
    if isinstance(match, dict) and len(match) == 1:
        (kind, name), = match.items()
        if kind == "type":
            module_type = getattr(nn, str(name), None)
            if isinstance(module_type, type) and issubclass(module_type, nn.Module):
                return module_type
            raise RulesFileError(f"{where}: unknown module type {name!r}: expected a torch.nn class such as Conv2d or Linear.")
        if kind == "role" and isinstance(name, str):
            return ("role", name)
    raise RulesFileError(
        f"{where}: 'match' must be a name, glob or 're:' regex, {{type: <torch.nn class>}} or "
        f"{{role: <surgery role name>}}. Got {match!r}."
    )


def _apply(where: str, apply):
    if apply is None:
        return None
    items = apply if isinstance(apply, list) else [apply]
    if not items:
        raise RulesFileError(f"{where}: 'apply' is an empty list; use null to exclude tensors.")
    built = [_constraint(where, item) for item in items]
    return built[0] if len(built) == 1 else built


def _constraint(where: str, item):
    name, arguments = (item, None) if isinstance(item, str) else _single(where, item)
    make = CONSTRAINTS.get(name)
    if make is None:
        raise RulesFileError(f"{where}: unknown constraint {name!r}. Known: {', '.join(CONSTRAINTS)}.")
    arguments = {} if arguments is None else arguments
    if not isinstance(arguments, dict):
        raise RulesFileError(f"{where}: arguments of {name} must be a mapping. Got {arguments!r}.")
    try:
        return make(**arguments)
    except (TypeError, ValueError) as error:
        raise RulesFileError(f"{where}: {name}({_arguments(arguments)}): {error}") from None


def _single(where: str, item):
    if isinstance(item, dict) and len(item) == 1:
        return next(iter(item.items()))
    raise RulesFileError(f"{where}: each constraint is a name or a one-key mapping {{Name: {{arguments}}}}. Got {item!r}.")


def _arguments(arguments: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in arguments.items())

r"""A dry run of a rules file on a model: what each rule matches and the constraints that result.

Behind ``torchconstrain inspect MODEL --rules FILE``. Nothing is written anywhere: the
model is built or loaded in memory, and the constraints go on a copy.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

import torch
import torchvision
from torch import nn

from torchconstrain.keys import label, match
from torchconstrain.rules import constrain_and_finish
from torchconstrain.rulesfile import read_rules

__all__ = ["dry_run", "load_model"]


def load_model(spec: str) -> nn.Module:
    r"""Build torchvision model ``spec`` (``weights=None``), or load a whole model saved at path ``spec``.

    Raises:
        ValueError: ``spec`` is neither a torchvision model name nor a file holding an
            ``nn.Module`` (a ``state_dict`` is not enough: it has no architecture).
    """
    if Path(spec).is_file():
        try:
            loaded = torch.load(spec, map_location="cpu", weights_only=False)
        except Exception as error:  # not a torch.save file: unpickling fails in many ways
            raise ValueError(f"{spec}: not a file saved with torch.save ({type(error).__name__}: {error}).") from None
        if not isinstance(loaded, nn.Module):
            raise ValueError(
                f"{spec}: holds a {type(loaded).__name__}, not a model. Save the whole model with "
                "torch.save(model, path), or name a torchvision model."
            )
        return loaded
    names = torchvision.models.list_models()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        hint = f" Closest torchvision models: {', '.join(close)}." if close else ""
        raise ValueError(f"{spec}: no such file, and not a torchvision model name.{hint}")
    return torchvision.models.get_model(spec, weights=None)


def dry_run(model: nn.Module, path) -> tuple[str, bool]:
    r"""Describe what the rules file at ``path`` does to ``model``, without changing ``model``.

    Returns:
        ``(text, ok)``: per rule the tensors it matches, then the constraint table; ``ok``
        is false when a rule matches nothing, or only tensors a null rule excludes (the
        rules :func:`~torchconstrain.constrain` refuses).

    Example:
        >>> import pathlib, tempfile
        >>> from torch import nn
        >>> from torchconstrain.dryrun import dry_run
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "rules.yaml"
        >>> _ = path.write_text("rules:\n  - match: {type: Linear}\n    apply: NonNeg\n")
        >>> text, ok = dry_run(nn.Sequential(nn.Linear(2, 2)), path)
        >>> ok, text.splitlines()[0]
        (True, 'rule 0 (Linear) at line 2: 1 tensor')
    """
    rules_file = read_rules(path)
    work = copy.deepcopy(model)
    rules, finish = rules_file.to_rules(work)
    matched = [match(work, key, caller=rules_file.rule_name(index))
               for index, (key, _) in enumerate(rules[:len(rules_file.rules)])]
    excluded = {name for names, (_, value) in zip(matched, rules) if value is None for name in names}
    lines, ok = [], True
    for index, names in enumerate(matched):
        left = [name for name in names if name not in excluded] if rules[index][1] is not None else names
        ok = ok and bool(left)
        lines.append(_rule_header(rules_file, index, rules[index][0], len(names)))
        lines += [f"  {name}" for name in names] or ["  (nothing: fix the key, or this rule is an error)"]
        if names and not left:
            lines.append("  (every one excluded by a null rule: it constrains nothing, so this rule is an error)")
    block_names = [key for key, _ in rules[len(rules_file.rules):]]
    if rules_file.blocks is not None:
        lines.append(f"blocks (surgery.mask_blocks {rules_file.blocks}): {len(block_names)} tensors")
        lines += [f"  {name}" for name in block_names]
    report = constrain_and_finish(work, rules, finish, strict=False, rule_names=rules_file.rule_name)
    lines += ["", str(report)]
    return "\n".join(lines), ok


def _rule_header(rules_file, index: int, key, count: int) -> str:
    line = rules_file.lines[index] if index < len(rules_file.lines) else None
    where = f" at line {line}" if line else ""
    return f"rule {index} ({label(key)}){where}: {count} tensor{'s' if count != 1 else ''}"

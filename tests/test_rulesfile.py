import json

import pytest
import torch
import torchvision
from conftest import assert_unchanged, snapshot
from torch import nn

import torchconstrain.rules
from torchconstrain import Clamp, FixedMask, LearnableMask, NonNeg, constrain, surgery
from torchconstrain.__main__ import main
from torchconstrain.rulesfile import CONSTRAINTS, RulesFileError, read_rules

YAML = """\
# a comment
rules:
  - match: features.0
    apply: {Clamp: {min: -0.5, max: 0.5}}
  - match: {type: Linear}
    apply: [NonNeg, {FixedMask.magnitude: {sparsity: 0.5}}]
  - match: "re:features\\\\.3\\\\.weight"
    apply: {LearnableMask: {per: channel}}
  - match: head.bias
    apply: null
"""

PYTHON_RULES = [
    ("features.0", Clamp(-0.5, 0.5)),
    (nn.Linear, [NonNeg(), FixedMask.magnitude(sparsity=0.5)]),
    (r"re:features\.3\.weight", LearnableMask(per="channel")),
    ("head.bias", None),
]


def as_json() -> str:
    return json.dumps({"rules": [
        {"match": "features.0", "apply": {"Clamp": {"min": -0.5, "max": 0.5}}},
        {"match": {"type": "Linear"}, "apply": ["NonNeg", {"FixedMask.magnitude": {"sparsity": 0.5}}]},
        {"match": r"re:features\.3\.weight", "apply": {"LearnableMask": {"per": "channel"}}},
        {"match": "head.bias", "apply": None},
    ]})


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def build(seed=0) -> nn.Module:
    from conftest import SmallNet

    torch.manual_seed(seed)
    return SmallNet()


def test_yaml_json_and_python_rules_give_the_same_model(tmp_path):
    models = [build(), build(), build()]
    reports = [
        constrain(models[0], write(tmp_path, "rules.yaml", YAML)),
        constrain(models[1], str(write(tmp_path, "rules.json", as_json()))),
        constrain(models[2], PYTHON_RULES),
    ]
    tables = [str(r).replace("rule 1 (Linear)", "") for r in reports]
    assert tables[0] == tables[1]
    assert [r["constraints"] for r in reports[0]] == [r["constraints"] for r in reports[2]]
    states = [m.state_dict() for m in models]
    for key in states[2]:
        assert torch.equal(states[0][key], states[2][key]) and torch.equal(states[1][key], states[2][key]), key


def test_every_registered_constraint_builds_from_a_file(tmp_path):
    arguments = {"Clamp": {"max": 1.0}, "MaxNorm": {"max_value": 1.0}, "L1": {"weight": 0.1}, "L2": {"weight": 0.1},
                 "FixedMask.magnitude": {"sparsity": 0.5}, "FixedMask.global_magnitude": {"sparsity": 0.5},
                 "FixedMask.random": {"sparsity": 0.5, "seed": 0}, "FixedMask.structured": {"sparsity": 0.5}}
    items = [{name: arguments.get(name)} for name in CONSTRAINTS]
    rules = read_rules(write(tmp_path, "all.json", json.dumps({"rules": [{"match": "x", "apply": items}]}))).rules
    assert [type(c).__name__ for c in rules[0][1]] == [
        "Clamp", "NonNeg", "MaxNorm", "UnitNorm", "FakeQuant", "FakeQuant", "LearnableMask",
        "FixedMask", "FixedMask", "FixedMask", "FixedMask", "FixedMask", "L1", "L2"]
    assert rules[0][1][5].min_scale == 2**-12  # FakeQuant.xnnpack


@pytest.mark.parametrize(
    "text, message",
    [
        ("rules:\n  - match: a\n    apply: {Clampp: {min: 0}}\n",
         r"rules.yaml, rule 0 \(line 2\): unknown constraint 'Clampp'. Known: Clamp, NonNeg"),
        ("rules:\n  - match: a\n    apply: NonNeg\n  - match: b\n    apply: {Clamp: {min: 2, max: 1}}\n",
         r"rule 1 \(line 4\): Clamp\(min=2, max=1\): Clamp: expected min <= max"),
        ("rules:\n  - match: a\n    apply: {Clamp: {low: 1}}\n",
         r"rule 0 \(line 2\): Clamp\(low=1\): .*unexpected keyword argument 'low'"),
        ("rules:\n  - match: {type: Conv9d}\n    apply: NonNeg\n", "rule 0 \\(line 2\\): unknown module type 'Conv9d'"),
        ("rules:\n  - match: a\n", r"rule 0 \(line 2\): expected a mapping with 'match' and 'apply'. Got \['match'\]"),
        ("rules:\n  - match: a\n    apply: []\n", "'apply' is an empty list; use null"),
        ("rule:\n  - match: a\n", "expected a mapping with a 'rules' list"),
        ("rules: []\nblock: {}\n", r"unknown top-level keys \['block'\]"),
        ("rules: []\nblocks: {sparsity: 0.5, learn: true}\n", r"blocks: unknown options \['learn'\]"),
        ("rules: [\n", "not valid YAML"),
        ("rules:\n  - match: a\n    apply: NonNeg\nrules:\n  - match: b\n    apply: NonNeg\n",
         r"rules.yaml, line 4: the key 'rules' is given twice"),  # YAML would keep the second only
        ("rules:\n  - match: a\n    match: b\n    apply: NonNeg\n", r"line 3: the key 'match' is given twice"),
        ("rules:\n  - match: a\n    apply: {Clamp: {min: -1, max: 1, min: -5}}\n", r"line 3: the key 'min' is given twice"),
    ],
)
def test_bad_yaml_files_name_the_file_rule_and_line(tmp_path, text, message):
    with pytest.raises(RulesFileError, match=message):
        read_rules(write(tmp_path, "rules.yaml", text))


def test_bad_json_and_paths(tmp_path):
    with pytest.raises(RulesFileError, match=r"rules.json, rule 0: unknown constraint 'Nope'"):
        read_rules(write(tmp_path, "rules.json", '{"rules": [{"match": "a", "apply": "Nope"}]}'))
    with pytest.raises(RulesFileError, match="not valid JSON"):
        read_rules(write(tmp_path, "broken.json", "{"))
    twice = '{"rules": [{"match": "a", "apply": {"Clamp": {"min": -1, "max": 1, "min": -5}}}]}'
    with pytest.raises(RulesFileError, match=r"rules.json: the key 'min' is given twice in one object"):
        read_rules(write(tmp_path, "rules.json", twice))
    with pytest.raises(RulesFileError, match="expected a .yaml, .yml or .json rules file. Got .txt"):
        read_rules(write(tmp_path, "rules.txt", "rules: []"))
    with pytest.raises(RulesFileError, match="missing.yaml: no such rules file"):
        read_rules(tmp_path / "missing.yaml")


def test_a_bad_file_leaves_the_model_unchanged(tmp_path):
    model = build()
    before = snapshot(model)
    path = write(tmp_path, "rules.yaml", "rules:\n  - match: head\n    apply: NonNeg\n  - match: nope\n    apply: NonNeg\n")
    with pytest.raises(ValueError, match=r"rules.yaml, rule 1 \(line 4\) \(nope\) matches no parameter"):
        constrain(model, path)
    assert_unchanged(model, before)


def test_blocks_and_roles_in_a_file(tmp_path):
    model = torchvision.models.mobilenet_v3_small(weights=None)
    path = write(tmp_path, "rules.yaml", "rules:\n  - match: {role: depthwise}\n    apply: {Clamp: {min: -1, max: 1}}\n"
                                         "blocks: {learnable: true, strength: 0.1}\n")
    report = constrain(model, path)
    assert report["features.1.block.0.0.weight"]["rules"] == "rule 0 (role depthwise)"
    project = model.features[4].block[3][0].parametrizations.weight[0]
    assert model.features[4].block[2].fc1.parametrizations.weight[0].scores is project.scores
    bad = write(tmp_path, "bad.yaml", "rules: []\nblocks: {sparsity: 2}\n")
    with pytest.raises(RulesFileError, match=r"bad.yaml, blocks: surgery.mask_blocks: expected sparsity in \[0, 1\)"):
        constrain(torchvision.models.mobilenet_v3_small(weights=None), bad)
    quoted = write(tmp_path, "quoted.yaml", 'rules: []\nblocks: {learnable: "false"}\n')  # a truthy string
    with pytest.raises(RulesFileError, match=r"quoted.yaml, blocks: surgery.mask_blocks: expected learnable to be True or False. Got str"):
        constrain(torchvision.models.mobilenet_v3_small(weights=None), quoted)
    role = write(tmp_path, "role.yaml", "rules:\n  - match: {role: dw}\n    apply: NonNeg\n")
    with pytest.raises(RulesFileError, match=r"role.yaml, rule 0 \(line 2\): surgery.role: unknown role 'dw'"):
        constrain(torchvision.models.mobilenet_v3_small(weights=None), role)


def test_a_mac_budget_for_the_blocks_in_a_file(tmp_path):
    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    dense = surgery.count_macs(model, torch.zeros(1, 3, 224, 224))
    path = write(tmp_path, "rules.yaml", "rules: []\nblocks: {learnable: true, groups: all, macs: 0.5}\n")
    constrain(model, path)
    budgets = {mask.budget for mask in model.modules() if isinstance(mask, LearnableMask)}
    assert len(budgets) == 1 and budgets.pop().keep == 0.5  # one budget over every group's gates
    report = surgery.shrink(model, measure=False)  # counted on the default 224x224 image, as the budget was
    assert report.targets["macs"] == (0.5, report.macs[1] / dense) and report.macs[1] <= 0.5 * dense
    bad = write(tmp_path, "bad.yaml", "rules: []\nblocks: {macs: 0.5, sparsity: 0.5}\n")
    with pytest.raises(RulesFileError, match=r"bad.yaml, blocks: surgery.mask_blocks: pass sparsity= .* not both"):
        constrain(torchvision.models.mobilenet_v3_small(weights=None), bad)


def test_a_mac_budget_in_a_file_is_counted_for_its_input_shape(tmp_path):
    small = torch.zeros(1, 3, 32, 32)
    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    path = write(tmp_path, "rules.yaml", "rules: []\nblocks: {groups: all, macs: 0.5, input_shape: [1, 3, 32, 32]}\n")
    constrain(model, path)
    report = surgery.shrink(model, example=small, measure=False, targets={"macs": 0.5})
    target, achieved = report.targets["macs"]
    assert 0.45 < achieved <= target == 0.5  # on 224x224 images the same budget keeps other channels
    for shape in ("[1, 3, 0, 32]", "32", "[]", "[1, 3, 32.5, 32]"):
        bad = write(tmp_path, "bad.yaml", f"rules: []\nblocks: {{macs: 0.5, input_shape: {shape}}}\n")
        with pytest.raises(RulesFileError, match=r"bad.yaml, blocks: expected input_shape as a list of sizes >= 1"):
            read_rules(bad)


def test_rules_constrain_takes_python_rules_and_says_where_files_go(tmp_path):
    model = build()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"rules.constrain: expected rules as a dict or a sequence of \(key, value\) "
                                        r"pairs. Got the path '.*rules.yaml': torchconstrain.constrain\(model, path\)"):
        torchconstrain.rules.constrain(model, write(tmp_path, "rules.yaml", YAML))
    assert_unchanged(model, before)


def test_a_file_with_learnable_blocks_warns_about_the_shared_scores_once(tmp_path):
    model = torchvision.models.mobilenet_v3_small(weights=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = write(tmp_path, "rules.yaml", "rules: []\nblocks: {learnable: true}\n")
    with pytest.warns(UserWarning, match="not in the optimizer") as record:
        constrain(model, path, optimizer=optimizer)
    assert record[0].filename == __file__
    named = str(record[0].message).split("will not train: ")[1].split(". ")[0].split(", ")
    assert len(named) == len({name.split(".block")[0] for name in named}) == 10  # one set of scores per block


def test_the_packaged_demo_rules_apply_to_mobilenet_v3_small():
    from importlib.resources import files

    path = files("torchconstrain") / "data" / "demo_rules.yaml"
    report = constrain(torchvision.models.mobilenet_v3_small(weights=None), str(path))
    kinds = {c.split("(")[0] for row in report for c in row["constraints"]}
    assert kinds == {"Clamp", "FixedMask", "LearnableMask"}


def test_inspect_prints_matches_and_the_constraint_table(tmp_path, capsys):
    path = write(tmp_path, "rules.yaml", "rules:\n  - match: features.0.0\n    apply: NonNeg\n"
                                         "  - match: {type: Linear}\n    apply: {L2: {weight: 0.1}}\n")
    assert main(["inspect", "mobilenet_v3_small", "--rules", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rule 0 (features.0.0) at line 2: 1 tensor\n  features.0.0.weight" in out
    assert "rule 1 (Linear) at line 4: 2 tensors\n  classifier.0.weight\n  classifier.3.weight" in out
    assert "constrained tensors" in out and "L2(weight=0.1)" in out


def test_inspect_fails_on_a_rule_that_matches_nothing_and_on_bad_models(tmp_path, capsys):
    path = write(tmp_path, "rules.yaml", "rules:\n  - match: featurs.0\n    apply: NonNeg\n")
    assert main(["inspect", "mobilenet_v3_small", "--rules", str(path)]) == 1
    assert "(nothing: fix the key" in capsys.readouterr().out
    assert main(["inspect", "mobilenet_v3_smal", "--rules", str(path)]) == 2
    assert "Closest torchvision models: mobilenet_v3_small" in capsys.readouterr().err
    saved = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), saved)
    assert main(["inspect", str(saved), "--rules", str(path)]) == 2
    assert "holds a OrderedDict, not a model" in capsys.readouterr().err
    text = write(tmp_path, "model.pt", "not a checkpoint\n")
    assert main(["inspect", str(text), "--rules", str(path)]) == 2
    assert "model.pt: not a file saved with torch.save (UnpicklingError" in capsys.readouterr().err


def test_inspect_fails_on_a_rule_whose_every_match_a_null_rule_excludes(tmp_path, capsys):
    # constrain refuses such a file; inspect listed the excluded tensors and exited 0.
    model_path = tmp_path / "model.pt"
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    torch.save(model, model_path)
    path = write(tmp_path, "rules.yaml", "rules:\n  - match: '1.*.weight'\n    apply: NonNeg\n"
                                         "  - match: '1.*'\n    apply: null\n")
    with pytest.raises(ValueError, match="matches only tensors that a None rule excludes"):
        constrain(model, str(path))
    assert main(["inspect", str(model_path), "--rules", str(path)]) == 1
    captured = capsys.readouterr()
    assert "1.0.weight\n  (every one excluded by a null rule" in captured.out
    assert "a rule matches nothing, or only tensors a null rule excludes" in captured.err


def test_inspect_loads_a_saved_model(tmp_path, capsys):
    model_path = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.Linear(3, 3)), model_path)
    path = write(tmp_path, "rules.yaml", "rules:\n  - match: '0'\n    apply: NonNeg\n")
    assert main(["inspect", str(model_path), "--rules", str(path)]) == 0
    assert "0.weight" in capsys.readouterr().out


@pytest.mark.parametrize(
    "rule, message",
    [
        ("  - match: 're:('\n    apply: NonNeg\n", r"rules.yaml, rule 1 \(line 4\) \(re:\(\) is not a valid regex"),
        ("  - match: featurs.3\n    apply: NonNeg\n", r"rules.yaml, rule 1 \(line 4\) \(featurs.3\) matches no parameter. Closest names: features.3"),
        ("  - match: features.0\n    apply: FixedMask.n_m\n",
         r"rules.yaml, rule 1 \(line 4\) \(features.0\): features.0.weight: 2:4 sparsity needs dim 1 to be divisible by 4"),
        ("  - match: {type: Linear}\n    apply: {Clamp: {min: 2, max: 3}}\n",
         r"Clamp\(min=2, max=3\) from .*rules.yaml, rule 1 \(line 4\) \(Linear\) cannot follow Clamp\(min=0, max=1\) from "
         r".*rules.yaml, rule 0 \(line 2\) \(head\): the boxes"),
    ],
)
def test_errors_found_when_the_rules_apply_name_the_file_and_line(tmp_path, rule, message):
    model = build()
    before = snapshot(model)
    path = write(tmp_path, "rules.yaml", "rules:\n  - match: head\n    apply: {Clamp: {min: 0, max: 1}}\n" + rule)
    with pytest.raises(ValueError, match=message):
        constrain(model, path)
    assert_unchanged(model, before)


def test_a_rules_file_that_is_not_utf8_is_refused_by_name(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_bytes("rules:\n  - match: t\u00eate\n    apply: NonNeg\n".encode("latin-1"))
    with pytest.raises(RulesFileError, match=r"rules.yaml: not UTF-8 text .*Save the rules file as UTF-8"):
        read_rules(path)
    path.write_text("# t\u00eate: UTF-8 is fine\nrules:\n  - match: head\n    apply: NonNeg\n", encoding="utf-8")
    assert read_rules(path).rules[0][0] == "head"


def test_inspect_names_the_file_and_line_of_a_bad_regex(tmp_path, capsys):
    path = write(tmp_path, "rules.yaml", "rules:\n  - match: head\n    apply: NonNeg\n  - match: 're:['\n    apply: NonNeg\n")
    assert main(["inspect", "resnet18", "--rules", str(path)]) != 0
    assert "rules.yaml, rule 1 (line 4): key (re:[) is not a valid regex" in capsys.readouterr().err


def test_numbers_in_exponent_form_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-2 as a string; JSON and YAML 1.2 read it as a number, as users write it.
    path = write(tmp_path, "rules.yaml", "rules:\n  - match: head.weight\n    apply: {Clamp: {min: -1e-2, max: 2E-2}}\n")
    model = build()
    report = constrain(model, path)
    assert report["head.weight"]["constraints"] == ["Clamp(min=-0.01, max=0.02)"]


@pytest.mark.parametrize("text, message", [
    ('rules:\n  - match: "0"\n    apply: NonNeg\nfoo: 1\n2: 3\n', r"unknown top-level keys \[2, 'foo'\]"),
    ('rules:\n  - match: "0"\n    apply: NonNeg\n    1: x\n', r"expected a mapping with 'match' and 'apply'. Got \[1, 'apply', 'match'\]"),
    ('rules:\n  - match: "0"\n    apply: NonNeg\nblocks: {learnable: true, 1: 2}\n', r"blocks: unknown options \[1\]"),
    ('rules: &a\n  - match: "0"\n    apply: NonNeg\n  - *a\n', r"rule 1 \(line 1\): expected a mapping with 'match' and 'apply'"),
    ('rules:\n  - match: {role: [depthwise]}\n    apply: NonNeg\n', r"\{role: <surgery role name>\}. Got \{'role': \['depthwise'\]\}"),
    ("rules: null\n", r"expected a mapping with a 'rules' list. Got 'rules' as NoneType"),
    ('rules:\n  match: "0"\n  apply: NonNeg\n', r"expected a mapping with a 'rules' list. Got 'rules' as dict"),
])
def test_malformed_rules_files_are_refused_with_a_message_not_a_traceback(tmp_path, text, message):
    # Mixed-type keys crashed sorting them, a recursive alias recursed, a list role was hashed.
    with pytest.raises(RulesFileError, match=message):
        read_rules(write(tmp_path, "rules.yaml", text))


def test_an_unexpected_error_exits_with_3_and_its_traceback(tmp_path, capsys, monkeypatch):
    # An uncaught error exited with 1, the code for "a rule matches nothing".
    import torchconstrain.dryrun

    def broken(model, path):
        raise RuntimeError("broken dry run")

    monkeypatch.setattr(torchconstrain.dryrun, "dry_run", broken)
    path = write(tmp_path, "rules.yaml", "rules:\n  - match: features.0.0\n    apply: NonNeg\n")
    assert main(["inspect", "mobilenet_v3_small", "--rules", str(path)]) == 3
    err = capsys.readouterr().err
    assert "RuntimeError: broken dry run" in err and "Traceback" in err
    assert "torchconstrain inspect: unexpected error" in err

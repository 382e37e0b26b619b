import importlib

import pytest
import torch
import torchvision
from conftest import assert_unchanged, snapshot
from torch import nn

from torchconstrain import FakeQuant, FixedMask, bake, check, constrain, surgery
from torchconstrain import deploy
from torchconstrain.__main__ import main
from torchconstrain.deploy import XNNPACK_MIN_SCALE, load_program, prepare, to_executorch

pytest.importorskip("executorch.runtime")


def digits_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 6 * 6, 10))


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits, a split, and a small conv net trained on them under FakeQuant.xnnpack()."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(bunch.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    torch.manual_seed(0)
    model = digits_net()
    constrain(model, {nn.Conv2d: FakeQuant.xnnpack(), nn.Linear: FakeQuant.xnnpack()})
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        for batch in train.split(64):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    check(model)
    return model.eval(), images[train], images[test], labels[test]


@pytest.fixture(scope="module")
def programs(digits):
    model, train_x, test_x, _ = digits
    before = {key: value.clone() for key, value in model.state_dict().items()}
    example = test_x[:1]
    fp32 = to_executorch(model, example)
    int8 = to_executorch(model, example, int8=True, calibration=train_x[:256].split(64))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)  # a copy was baked
    return fp32, int8


def accuracy(program, images, labels) -> float:
    logits = torch.cat([program(image) for image in images.split(1)])
    return (logits.argmax(dim=1) == labels).float().mean().item()


def test_the_fp32_program_computes_what_the_baked_model_computes(digits, programs):
    model, _, test_x, _ = digits
    baked = prepare(model)
    assert not any(hasattr(m, "parametrizations") for m in baked.modules())
    fp32, _ = programs
    assert not fp32.int8 and fp32.moved == {} and fp32.input_shapes == ((1, 1, 8, 8),)
    with torch.no_grad():
        for image in test_x[:40].split(1):
            torch.testing.assert_close(fp32(image), baked(image), rtol=1e-6, atol=1e-5)  # float32 rounding


def test_weights_trained_under_fake_quant_xnnpack_go_through_int8_unchanged(digits, programs):
    model, _, test_x, test_y = digits
    fp32, int8 = programs
    assert int8.int8 and int8.moved == {"0": 0, "2": 0, "5": 0}
    assert abs(accuracy(int8, test_x, test_y) - accuracy(fp32, test_x, test_y)) <= 0.01
    assert accuracy(fp32, test_x, test_y) > 0.9
    assert int8.size < fp32.size / 2


def test_moved_counts_the_weights_another_grid_rounds():
    # Small weights: max|w| / 127 is under XNNPACK's scale floor, so only a grid with the same floor survives.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4))
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(0.05)
    assert model[0].weight.abs().max() / 127 < XNNPACK_MIN_SCALE
    constrain(model, {"0": FakeQuant(8), "1": FakeQuant.xnnpack()})
    program = to_executorch(model, torch.randn(1, 16), int8=True, calibration=[torch.randn(64, 16)])
    assert program.moved["1"] == 0
    assert program.moved["0"] > 0 and program.moved["2"] > 0  # FakeQuant without the floor; no FakeQuant
    # the peer: torch's per-channel fake quantization with XNNPACK's floored scale leaves layer 1 as it is
    bake(model)
    weight = model[1].weight.detach()
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(XNNPACK_MIN_SCALE)
    peer = torch.fake_quantize_per_channel_affine(weight, scale, torch.zeros(16, dtype=torch.int32), 0, -127, 127)
    assert torch.equal(peer, weight)


def test_a_saved_program_loads_and_runs(programs, tmp_path, digits):
    fp32, _ = programs
    path = fp32.save(tmp_path / "model.pte")
    assert path.stat().st_size == fp32.size
    again = load_program(path, input_shapes=fp32.input_shapes)
    image = digits[2][:1]
    assert torch.equal(again(image), fp32(image))
    assert fp32.latency(image, min_run_time=0.01) > 0
    with pytest.raises(ValueError, match=r"the program takes inputs of shapes \[\(1, 1, 8, 8\)\]. Got \[\(2, 1, 8, 8\)\]"):
        fp32(digits[2][:2])


def test_the_thread_pool_is_not_resized_once_a_program_ran(programs, digits):
    fp32, _ = programs
    fp32(digits[2][:1])
    current = deploy.threads()
    deploy.set_threads(current)  # the same size: nothing to do
    with pytest.raises(ValueError, match="cannot resize its thread pool"):
        deploy.set_threads(current + 1)
    with pytest.raises(ValueError, match="expected an integer >= 1. Got 0"):
        deploy.set_threads(0)
    assert deploy.threads() == current


def test_prepare_shrinks_and_folds_a_copy():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    surgery.mask_blocks(model, sparsity=0.5)
    model.eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    example = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(example)
        small = prepare(model, example[:1], shrink=True, fold_batchnorm=True)
        torch.testing.assert_close(small(example), expected, rtol=1e-4, atol=1e-4)
    assert surgery.count_params(small) < 0.8 * surgery.count_params(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.features.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        return self.layer(x) if x.sum() > 0 else -x  # a branch on a tensor value: torch.export cannot capture it


def test_a_model_that_cannot_be_captured_is_refused_and_left_as_it_was():
    model = Branchy()
    constrain(model, {"layer": FixedMask.magnitude(sparsity=0.5)})
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="torch.export cannot capture the model .*no Python branches") as info:
        to_executorch(model, torch.randn(1, 4))
    assert info.value.__cause__ is not None
    assert hasattr(model.layer, "parametrizations")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("arguments, error, message", [
    ({"int8": True}, ValueError, "int8=True needs calibration data"),
    ({"int8": True, "calibration": []}, ValueError, "calibration holds no batch"),
    ({"calibration": [torch.randn(2, 8)]}, ValueError, "calibration data is only used with int8=True"),
    ({"int8": True, "calibration": ["images"]}, TypeError, "calibration batch 0: expected a tensor or a tuple of tensors"),
    ({"int8": True, "calibration": torch.randn(8, 3, 8, 8)}, TypeError,  # each image taken for a batch
     r"expected calibration as an iterable of input batches. Got one tensor of shape \(8, 3, 8, 8\)"),
])
def test_bad_arguments_are_refused_before_any_work(net, arguments, error, message):
    before = snapshot(net)
    with pytest.raises(error, match=message):
        to_executorch(net, torch.randn(1, 3, 8, 8), **arguments)
    assert_unchanged(net, before)


def test_bad_examples_and_models_are_refused(net):
    with pytest.raises(TypeError, match="example: expected a tensor or a tuple of tensors. Got a list of list"):
        to_executorch(net, [[1.0]])
    with pytest.raises(TypeError, match="expected an nn.Module. Got dict"):
        to_executorch({}, torch.randn(1, 3))


def test_calibration_batches_that_do_not_fit_are_named(net):
    with pytest.raises(ValueError, match=r"calibration batch 1 \(shapes \[\(4, 3, 5, 5\)\]\) does not run"):
        to_executorch(net, torch.randn(1, 3, 8, 8), int8=True,
                      calibration=[torch.randn(4, 3, 8, 8), torch.randn(4, 3, 5, 5)])


def test_without_executorch_the_error_names_the_extra(monkeypatch, net):
    real = importlib.import_module

    def without_executorch(name, *args):
        if name.startswith("executorch"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(deploy.importlib, "import_module", without_executorch)
    with pytest.raises(ModuleNotFoundError, match=r"needs the executorch package .*pip install 'torchconstrain\[deploy\]'"):
        to_executorch(net, torch.randn(1, 3, 8, 8))


def test_the_export_command_writes_a_program_that_runs(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    constrain(model, {nn.Linear: FakeQuant.xnnpack()})
    torch.save(model, tmp_path / "model.pt")
    torch.save(torch.randn(20, 16), tmp_path / "inputs.pt")
    out = tmp_path / "model.pte"
    assert main(["export", str(tmp_path / "model.pt"), "--to", "executorch", "--int8", "--calibrate", "16",
                 "--data", str(tmp_path / "inputs.pt"), "--input-shape", "1,16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: int8 ExecuTorch program (XNNPACK)" in printed
    assert "int8 weights: 2 tensors quantized, 0 entries moved off their float values" in printed
    program = load_program(out, input_shapes=[(1, 16)], int8=True)
    x = torch.randn(1, 16)
    bake(model)
    with torch.no_grad():
        assert 0 < (program(x) - model(x)).abs().max() < 0.05  # int8 rounding of the activations


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 4), nn.Linear(16, 2)

    def forward(self, x):
        return {"logits": self.a(x), "aux": (self.b(x),)}


class _Noisy(nn.Module):
    """A forward whose program cannot compute what the model does (its own random draws)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 4)

    def forward(self, x):
        return self.a(x) + torch.rand(4)


def test_the_export_command_compares_every_output_with_the_saved_model_before_writing(tmp_path, capsys):
    # A model with several outputs failed after writing the file (tuple - tuple); a program
    # that computes something else was written and reported with exit 0.
    torch.save(_TwoHeads(), tmp_path / "two.pt")
    assert main(["export", str(tmp_path / "two.pt"), "--to", "executorch", "--input-shape", "1,16",
                 "--out", str(tmp_path / "two.pte")]) == 0
    assert "ExecuTorch vs the saved model's outputs" in capsys.readouterr().out
    torch.save(_Noisy(), tmp_path / "noisy.pt")
    assert main(["export", str(tmp_path / "noisy.pt"), "--to", "executorch", "--input-shape", "1,16",
                 "--out", str(tmp_path / "noisy.pte")]) == 1
    assert "the fp32 program's outputs differ from the saved model's" in capsys.readouterr().err
    assert not (tmp_path / "noisy.pte").exists()


@pytest.mark.parametrize("arguments, message", [
    (["no_such_net", "--to", "executorch", "--out", "x.pte"], "no_such_net: no such file, and not a torchvision model"),
    (["resnet18", "--to", "executorch", "--out", "x.pte", "--input-shape", "1,a"], "expected sizes >= 1"),
    (["resnet18", "--to", "executorch", "--out", "x.pte", "--calibrate", "8"], "pass --int8 with them"),  # was ignored
    (["resnet18", "--to", "executorch", "--out", "/no/such/folder/x.pte"],  # failed only after the lowering
     "--out /no/such/folder/x.pte: cannot be written: /no/such/folder does not exist"),
    (["resnet18", "--to", "executorch", "--out", "/"], "--out /: is a folder"),
])
def test_the_export_command_refuses_bad_input(arguments, message, capsys):
    try:
        code = main(["export", *arguments])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err

import io

import pytest
import torch
from conftest import SmallNet, TiedNet, tokens

from torchconstrain import Clamp, FixedMask, LearnableMask, bake, constrain

RULES = {
    "features.0": [Clamp(-0.1, 0.1), FixedMask.magnitude(sparsity=0.5)],
    "features.3": FixedMask.n_m(2, 4),
    "head": LearnableMask(per="channel"),
}


def constrained() -> SmallNet:
    torch.manual_seed(0)
    model = SmallNet()
    constrain(model, RULES)
    return model.eval()


def baked() -> tuple[SmallNet, torch.Tensor, torch.Tensor]:
    model = constrained()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = model(x)
    bake(model)
    return model, x, expected


def test_export_before_bake_computes_the_constraints_in_the_graph():
    model = constrained()
    x = torch.randn(2, 3, 9, 9)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        model.features[0].parametrizations.weight[1].mask.zero_()  # buffers are inputs, not constants
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


def test_export_of_a_tied_model_leaves_it_holding_its_parameter():
    # export swaps fake tensors in under both tied names, and a nested call swaps again.
    model = TiedNet().eval()
    constrain(model, {"head": [FixedMask.random(sparsity=0.5, seed=0), Clamp(-0.1, 0.1)]})
    stored = model.emb.parametrizations.weight.original
    x = tokens()
    program = torch.export.export(model, (x,))
    assert model.emb.parametrizations.weight.original is stored
    assert model.head.parametrizations.weight.original is stored
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
def test_export_trace_and_script_after_bake():
    model, x, expected = baked()
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)
    for compiled in (torch.jit.trace(model, (x,)), torch.jit.script(model)):
        buffer = io.BytesIO()
        torch.jit.save(compiled, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.jit.load(buffer)(x), expected, rtol=0, atol=0)


def test_onnx_export_after_bake():
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch.onnx.export's exporter
    model, x, expected = baked()
    program = torch.onnx.export(model, (x,), dynamo=True)
    proto = program.model_proto
    onnx.checker.check_model(proto)
    runtime = pytest.importorskip("onnxruntime")
    session = runtime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-5)

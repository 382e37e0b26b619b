"""Lightning: a constrained LightningModule trains with ``Trainer.fit``, checkpoints and resumes
through Lightning's own checkpoints, and Lightning's weight averaging (which swaps weights
through ``.data``) leaves the fast path's values those of the plain path."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchconstrain import (
    Clamp,
    FixedMask,
    LearnableMask,
    NonNeg,
    PruningSchedule,
    bake,
    check,
    constrain,
    param_groups,
    penalty,
    set_fast_path,
)

L = pytest.importorskip("lightning")
callbacks = pytest.importorskip("lightning.pytorch.callbacks")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

RULES = {"0.weight": Clamp(-0.1, 0.1), "2.weight": LearnableMask(per="channel"), "2.bias": NonNeg(),
         nn.Linear: FixedMask.magnitude(sparsity=0.0)}


class Classifier(L.LightningModule):
    """A small conv net, constrained in ``__init__`` (so checkpoints load into a fresh one),
    with a pruning schedule whose step is saved in Lightning's checkpoints."""

    def __init__(self, final_sparsity: float = 0.5, end: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        constrain(self.net, RULES)
        self.schedule = PruningSchedule(self.net, final_sparsity=final_sparsity, end=end, every=2)
        self.probes = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_index):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y) + penalty(self.net)

    def validation_step(self, batch, batch_index):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def on_train_batch_end(self, *args) -> None:
        self.schedule.step()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["pruning"] = self.schedule.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.schedule.load_state_dict(checkpoint["pruning"])

    def configure_optimizers(self):
        return torch.optim.SGD(param_groups(self.net), lr=0.5, momentum=0.9, weight_decay=1e-2)


def batches() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 3, 8, 8, generator=generator), torch.randint(0, 4, (40,), generator=generator))
    return DataLoader(data, batch_size=8)


def trainer(root, epochs: int, **options) -> "L.Trainer":
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, **options)


def masked_share(model: Classifier) -> list[float]:
    return [round(float((model.net[i].weight == 0).float().mean()), 3) for i in (5, 7)]


def test_fit_keeps_every_constraint_and_a_checkpoint_loads_into_a_fresh_module(tmp_path):
    model = Classifier()
    trainer(tmp_path, 3).fit(model, batches())  # SGD with momentum and weight decay, 15 steps
    report = check(model.net)
    assert report["0.weight"]["min"] >= -0.1 and report["0.weight"]["max"] <= 0.1
    assert report["2.bias"]["min"] >= 0
    assert masked_share(model) == [0.5, 0.5]  # momentum resurrects no masked weight
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    loaded = Classifier.load_from_checkpoint(path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert loaded.schedule.state_dict() == model.schedule.state_dict()
    expected = model.eval()(x)
    bake(model.net)
    assert type(model.net[0]) is nn.Conv2d and torch.equal(model(x), expected)


def test_resuming_from_a_checkpoint_gives_the_bits_of_an_uninterrupted_fit(tmp_path):
    straight = Classifier()
    trainer(tmp_path / "straight", 2).fit(straight, batches())
    first = Classifier()
    trainer(tmp_path / "resumed", 1).fit(first, batches())
    (path,) = (tmp_path / "resumed" / "checkpoints").glob("*.ckpt")
    resumed = Classifier()
    trainer(tmp_path / "resumed", 2).fit(resumed, batches(), ckpt_path=path)  # optimizer and schedule restored
    assert straight.state_dict().keys() == resumed.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_bf16_mixed_precision_and_gradient_clipping_keep_the_constraints(tmp_path):
    model = Classifier()
    trainer(tmp_path, 2, precision="bf16-mixed", gradient_clip_val=0.5).fit(model, batches())
    assert check(model.net)["0.weight"]["max"] <= 0.1
    assert model.net[0].parametrizations.weight.original.dtype == torch.float32


class Probe(callbacks.Callback):
    """Runs the model without gradients where users log samples: after each validation epoch."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.outputs = x, []

    def on_validation_epoch_end(self, trainer, module) -> None:
        with torch.no_grad():
            self.outputs.append(module(self.x))


def test_weight_averaging_swaps_through_data_and_the_fast_path_follows(tmp_path):
    """``EMAWeightAveraging`` swaps the averaged weights in for validation and back through
    ``.data``; a no-grad forward after the swap back must see the current weights."""
    x = torch.randn(4, 3, 8, 8)
    runs = {}
    for fast in (True, False):
        with set_fast_path(fast):
            model, probe = Classifier(), Probe(x)
            averaging = callbacks.EMAWeightAveraging(decay=0.9, use_buffers=False)
            trainer(tmp_path / str(fast), 3, callbacks=[averaging, probe]).fit(model, batches(), batches())
            runs[fast] = probe.outputs, model(x)
    (fast_probes, fast_final), (plain_probes, plain_final) = runs[True], runs[False]
    assert len(fast_probes) == 4  # the sanity check and three epochs
    assert all(torch.equal(a, b) for a, b in zip(fast_probes, plain_probes))
    assert torch.equal(fast_final, plain_final)


@pytest.mark.parametrize("use_buffers", [False, True])
def test_weight_averaging_keeps_the_masks_only_without_averaging_buffers(tmp_path, use_buffers):
    """Averaging buffers averages the bool masks as numbers: an entry kept once stays kept in
    the average, which is copied into the model at the end of ``fit``."""
    model = Classifier()
    averaging = callbacks.EMAWeightAveraging(decay=0.9, use_buffers=use_buffers)
    trainer(tmp_path, 3, callbacks=[averaging]).fit(model, batches())
    check(model.net)
    assert masked_share(model) == ([0.0, 0.0] if use_buffers else [0.5, 0.5])


def test_stochastic_weight_averaging_keeps_the_constraints_and_the_masks(tmp_path):
    model = Classifier()
    averaging = callbacks.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
    trainer(tmp_path, 4, callbacks=[averaging]).fit(model, batches())
    assert check(model.net)["0.weight"]["max"] <= 0.1
    assert masked_share(model) == [0.5, 0.5]

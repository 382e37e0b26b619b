r"""The demo from start to end: train plain and constrained, bake, shrink, measure, report."""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from torchconstrain.api import constrain
from torchconstrain.demo import report, stages
from torchconstrain.demo.config import DemoConfig, require_extras
from torchconstrain.demo.data import NUM_CLASSES, load_digits, make_model
from torchconstrain.demo.train import train
from torchconstrain.report import Report

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    r"""What :func:`run_demo` measured and wrote.

    Attributes:
        metrics: everything numeric, as written to ``metrics.json``.
        summary: the compact plain-text table the command line prints.
        files: the paths written into the report folder.
        ok: the shrunk and folded model's outputs match the baked model's within
            :data:`~torchconstrain.demo.stages.TOLERANCE`, and the fp32 ExecuTorch program's
            match the shrunk model's within :data:`~torchconstrain.demo.stages.PROGRAM_TOLERANCE`
            (``check`` raises on its own).
    """

    metrics: dict
    summary: str
    files: list[Path]
    ok: bool


def run_demo(config: DemoConfig | None = None, **settings) -> DemoResult:
    r"""Run the demo: MobileNetV3-Small on scikit-learn's digits, plain and under a rules file.

    Trains a plain model and a constrained copy of the same initial weights (the rules
    file's constraints, ``penalty`` in the loss, ``check`` after every epoch), bakes the
    constrained model, removes the block channels its learnable masks pruned
    (:func:`~torchconstrain.surgery.shrink`) and folds BatchNorm; then measures each
    model's test accuracy, sparsity, params, MACs and batch-1 CPU latency and writes
    ``report.md``, ``metrics.json`` and PNG plots into ``config.out``. Last, unless
    ``config.deploy`` is false, the shrunk and folded model goes to ExecuTorch programs
    (:func:`~torchconstrain.deploy.to_executorch`), fp32 and int8, written next to the
    report and measured in ExecuTorch's runtime: test accuracy, size, batch-1 latency.

    Args:
        config: the settings (default :class:`~torchconstrain.demo.DemoConfig()`).
        **settings: fields of :class:`~torchconstrain.demo.DemoConfig` to override.

    Returns:
        A :class:`DemoResult`.

    Raises:
        ValueError: a bad setting, or a rules file that cannot be read or applied
            (before any training).
        OSError: the report folder cannot be created (before any training).
        ModuleNotFoundError: scikit-learn, matplotlib, tqdm or executorch is missing (the
            ``demo`` extra).
        ConstraintViolation: ``check`` failed after an epoch.

    Example:
        >>> import tempfile
        >>> from torchconstrain.demo import run_demo
        >>> result = run_demo(epochs=1, limit_batches=1, latency_time=0.01, progress=False,
        ...                   out=tempfile.mkdtemp())  # doctest: +SKIP
        >>> result.ok, sorted(result.metrics["stages"])  # doctest: +SKIP
        (True, ['baked', 'constrained', 'executorch_fp32', 'executorch_int8', 'plain', 'shrunk'])
    """
    config = replace(config or DemoConfig(), **settings)
    config.validate()
    require_extras(deploy=config.deploy)
    with _threads(config.threads):
        return _run(config)


@contextmanager
def _threads(count: int):
    """Run with ``count`` torch CPU threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run(config: DemoConfig) -> DemoResult:
    started = time.perf_counter()
    data = load_digits(seed=config.seed)
    plain = make_model(config.seed)
    constrained = copy.deepcopy(plain)
    rules_report = constrain(constrained, str(config.rules_path))
    before = _effective(constrained, rules_report.names())
    Path(config.out).mkdir(parents=True, exist_ok=True)  # fail before training, not after
    histories, seconds = _train_both(plain, constrained, data, config)
    baked, bake_report = stages.baked_copy(constrained)
    shrunk, shrink_report, folded = stages.shrunk_copy(baked, data.test_x[:1])
    models = {"plain": plain, "constrained": constrained, "baked": baked, "shrunk": shrunk}
    metrics = _metrics(config, data, models, histories, _constraint_rows(rules_report, bake_report), shrink_report)
    programs = _export(shrunk, data, config, seconds)
    metrics["stages"].update({name: stages.measure_program(program, data) for name, program in programs.items()})
    metrics["verification"] = _verify(models, folded, data, config, programs)
    metrics["timing"] = _timing(models, data, config, seconds, started, programs)
    written = [program.save(Path(config.out) / f"{name}.pte") for name, program in programs.items()]
    files = report.write(Path(config.out), metrics, before, _effective(baked, rules_report.names())) + written
    verification = metrics["verification"]
    ok = verification["shrunk_matches_baked"] and verification.get("executorch_fp32_matches_shrunk", True)
    return DemoResult(metrics, report.summary(metrics, files), files, ok)


def _export(shrunk: nn.Module, data, config: DemoConfig, seconds: dict) -> dict:
    """The ExecuTorch programs of the shrunk, folded model (none without ``config.deploy``)."""
    if not config.deploy:
        return {}
    stages.executorch_threads()  # one thread, set before a program is loaded
    clock = time.perf_counter()
    programs = stages.programs(shrunk, data, calibration_images=config.calibration_images)
    seconds["executorch_export"] = time.perf_counter() - clock
    return programs


def _train_both(plain: nn.Module, constrained: nn.Module, data, config: DemoConfig) -> tuple[dict, dict]:
    """Train the plain model, then the constrained one; return their histories and wall times."""
    histories, seconds = {}, {}
    for name, model in (("plain", plain), ("constrained", constrained)):
        clock = time.perf_counter()
        histories[name] = train(model.to(config.device), data, config, name=name, constrained=model is constrained)
        seconds[f"{name}_training"] = time.perf_counter() - clock
    return histories, seconds


def _metrics(config: DemoConfig, data, models: dict, histories: dict, constraints: list[dict], shrink_report) -> dict:
    """Everything numeric that the same seed reproduces exactly."""
    return {
        "settings": config.to_dict(),
        "data": {"train_images": len(data.train_y), "test_images": len(data.test_y),
                 "image_size": data.test_x.shape[-1], "classes": NUM_CLASSES},
        "stages": {name: stages.measure(model, data) for name, model in models.items()},
        "history": histories,
        "constraints": constraints,
        "blocks": {name: {"before": a, "after": b} for name, (a, b) in shrink_report.channels.items()},
        "targets": dict(shrink_report.targets),
    }


def _verify(models: dict, folded: int, data, config: DemoConfig, programs: dict) -> dict:
    """``check`` held after every epoch (it raises otherwise); compare the outputs of the stages."""
    constrained, baked, shrunk = models["constrained"], models["baked"], models["shrunk"]
    images = data.test_x.to(config.device)
    difference, close = stages.max_difference(shrunk, baked, images)
    return {
        **_verify_programs(shrunk, data, programs),
        "baked_vs_constrained_max_abs_difference": stages.max_difference(baked, constrained, images)[0],
        "check_passed_epochs": config.epochs,
        "shrunk_vs_baked_max_abs_difference": difference,
        "shrunk_matches_baked": close,
        "tolerance": dict(stages.TOLERANCE),
        "folded_batchnorms": folded,
        "stock_load_max_abs_difference": stages.stock_difference(baked, images),
    }


def _verify_programs(shrunk: nn.Module, data, programs: dict) -> dict:
    """The fp32 program against the eager shrunk model; what int8 quantization moved."""
    if not programs:
        return {}
    fp32, int8 = programs["executorch_fp32"], programs["executorch_int8"]
    difference, close = stages.program_difference(fp32, copy.deepcopy(shrunk).cpu(), data.test_x)
    return {
        "executorch_fp32_vs_shrunk_max_abs_difference": difference,
        "executorch_fp32_matches_shrunk": close,
        "executorch_tolerance": dict(stages.PROGRAM_TOLERANCE),
        "executorch_int8_moved_weights": sum(int8.moved.values()),
    }


def _constraint_rows(rules_report: Report, bake_report: Report) -> list[dict]:
    """The rows of ``constrain``'s report, each with its tensor's sparsity after baking."""
    baked = {row["tensor"]: row["sparsity"] for row in bake_report}
    return [{**row, "shape": list(row["shape"]), "sparsity_after_bake": baked.get(row["tensor"])}
            for row in rules_report]


def _timing(models: dict, data, config: DemoConfig, seconds: dict, started: float, programs: dict) -> dict:
    """Latencies (the stages, the baked model with BatchNorm folded but not shrunk, the programs)
    and wall times: the only numbers that differ between two runs with the same seed."""
    timed = {**models, "folded": stages.folded_copy(models["baked"])}
    latency = stages.latencies(timed, data.test_x, min_run_time=config.latency_time)
    example = data.test_x[:1].cpu()
    latency.update({name: program.latency(example, min_run_time=config.latency_time)
                    for name, program in programs.items()})
    seconds["total"] = time.perf_counter() - started
    timing = {"latency_ms": {name: value * 1e3 for name, value in latency.items()}, "latency_threads": 1,
              "seconds": seconds, "training_threads": torch.get_num_threads()}
    if programs:
        timing["executorch_threads"] = stages.executorch_threads()
    return timing


def _effective(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """CPU copies of the effective values of the tensors ``names``."""
    values = {}
    with torch.no_grad():
        for fqn in names:
            module_name, _, tensor_name = fqn.rpartition(".")
            values[fqn] = getattr(model.get_submodule(module_name), tensor_name).detach().cpu().clone()
    return values

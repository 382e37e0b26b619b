r"""From a constrained or baked model to an ExecuTorch program (``.pte``) for XNNPACK, fp32 or int8.

:func:`to_executorch` bakes a copy of the model (optionally shrinks it and folds its
BatchNorms), captures it with ``torch.export`` and lowers it with ExecuTorch's
``XnnpackPartitioner``. With ``int8=True`` it quantizes first with PT2E
(``prepare_pt2e``/``convert_pt2e`` and ``XNNPACKQuantizer``): weights per output channel
on the symmetric ``[-127, 127]`` grid, activations per tensor from a few calibration
batches. A weight trained under :meth:`FakeQuant.xnnpack() <torchconstrain.FakeQuant.xnnpack>`
is already on that grid, and :attr:`Program.moved` counts, per quantized weight, the
entries that quantization moved anyway (none for those).

ExecuTorch is optional: ``pip install 'torchconstrain[deploy]'``. It is imported only
when a program is built or run.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark
from torch import Tensor, nn

from torchconstrain import surgery
from torchconstrain.bake import bake

__all__ = ["XNNPACK_MIN_SCALE", "Program", "load_program", "prepare", "set_threads", "threads", "to_executorch"]

#: The smallest weight scale of ``XNNPACKQuantizer`` (``eps`` of its observers).
XNNPACK_MIN_SCALE = 2**-12
INSTALL = "pip install 'torchconstrain[deploy]'"
_LINEAR_OPS = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.linear.default")


def _import(module: str):
    """Import an ExecuTorch (or torchao) module, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModuleNotFoundError(
            f"exporting to ExecuTorch needs the executorch package ({module} cannot be imported: {error}). "
            f"Install it with {INSTALL}."
        ) from error


@dataclass(eq=False)
class Program:
    r"""An ExecuTorch program: the bytes of a ``.pte`` file, runnable here with ExecuTorch's runtime.

    Attributes:
        buffer: the serialized program.
        int8: whether its weights and activations were quantized to int8.
        input_shapes: the shape of each input; the program takes exactly these.
        moved: for an int8 program, per quantized weight (its module's name), the number of
            entries whose int8 value times its scale is not bitwise the float weight that was
            quantized (after any BatchNorm folding); empty for fp32.
    """

    buffer: bytes
    int8: bool
    input_shapes: tuple[tuple[int, ...], ...]
    moved: dict[str, int] = field(default_factory=dict)
    _method: object = field(default=None, init=False, repr=False)

    @property
    def size(self) -> int:
        r"""The program's size in bytes (what :meth:`save` writes)."""
        return len(self.buffer)

    def save(self, path) -> Path:
        r"""Write the program to ``path`` (a ``.pte`` file) and return the path."""
        path = Path(path)
        path.write_bytes(self.buffer)
        return path

    def __call__(self, *inputs: Tensor):
        r"""Run the program with ExecuTorch's runtime; return its output (a tuple if several)."""
        shapes = tuple(tuple(x.shape) for x in inputs)
        if shapes != self.input_shapes:
            raise ValueError(f"the program takes inputs of shapes {list(self.input_shapes)}. Got {list(shapes)}.")
        outputs = self._loaded().execute([x.detach().cpu().contiguous() for x in inputs])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _loaded(self):
        global _loaded_any
        if self._method is None:
            _loaded_any = True
            runtime = _import("executorch.runtime").Runtime.get()
            self._method = runtime.load_program(self.buffer).load_method("forward")
        return self._method

    def latency(self, *inputs: Tensor, min_run_time: float = 1.0) -> float:
        r"""Return the median seconds of one run of ``inputs`` (:func:`threads` threads; see :func:`set_threads`)."""
        self(*inputs)  # loads, checks the shapes
        method, values = self._loaded(), [x.detach().cpu().contiguous() for x in inputs]
        for _ in range(3):  # warm-up
            method.execute(values)
        timer = benchmark.Timer("method.execute(values)", globals={"method": method, "values": values})
        return timer.blocked_autorange(min_run_time=min_run_time).median


_loaded_any = False  # whether this process has loaded a program: the thread pool is fixed from then on


def set_threads(count: int) -> None:
    r"""Set the number of threads of ExecuTorch's thread pool (one per process), which XNNPACK runs on.

    Call it before the first program runs: ExecuTorch 1.5 can crash or hang when its pool is
    resized after a program was loaded, so that is refused (unless ``count`` is the current size).
    By default the pool has one thread per core.

    Raises:
        ValueError: ``count`` is not an integer >= 1, or a program was loaded already and
            the pool has another size.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"set_threads: expected an integer >= 1. Got {count!r}.")
    if count == threads():
        return
    if _loaded_any:
        raise ValueError(f"set_threads({count}): a program was already loaded with {threads()} threads; ExecuTorch "
                         "cannot resize its thread pool safely after that. Call set_threads first in a new process.")
    _import("executorch.extension.pybindings.portable_lib")._unsafe_reset_threadpool(count)


def threads() -> int:
    r"""The number of threads of ExecuTorch's thread pool."""
    return int(_import("executorch.extension.pybindings.portable_lib")._threadpool_get_thread_count())


def load_program(path, *, input_shapes, int8: bool = False) -> Program:
    r"""Read a ``.pte`` file written by :meth:`Program.save` (give the shapes it takes)."""
    return Program(Path(path).read_bytes(), int8, tuple(tuple(shape) for shape in input_shapes))


def to_executorch(model: nn.Module, example, *, int8: bool = False, calibration=None, inplace: bool = False,
                  shrink: bool = False, fold_batchnorm: bool = False) -> Program:
    r"""Export ``model`` to an ExecuTorch program for the XNNPACK backend.

    The model (a copy, unless ``inplace``) goes to the CPU in eval mode and is baked
    (:func:`~torchconstrain.bake`: nothing to do for a plain model); then optionally
    :func:`surgery.shrink <torchconstrain.surgery.shrink>` removes the block channels that
    nothing reads and :func:`surgery.fold_batchnorm <torchconstrain.surgery.fold_batchnorm>`
    folds each BatchNorm into its conv. ``torch.export`` captures it with ``example`` and
    ExecuTorch lowers it, delegating what XNNPACK runs.

    With ``int8=True`` the captured graph is quantized with PT2E and ``XNNPACKQuantizer``
    (``get_symmetric_quantization_config(is_per_channel=True)``): each conv and linear
    weight per output channel on ``[-127, 127]`` with scale ``max|w| / 127`` floored at
    :data:`XNNPACK_MIN_SCALE`, activations per tensor from the ``calibration`` batches (PT2E
    also folds the BatchNorms that follow convs). Weights baked from
    :meth:`FakeQuant.xnnpack() <torchconstrain.FakeQuant.xnnpack>` keep their values bitwise;
    :attr:`Program.moved` counts the entries that moved.

    Args:
        model: a constrained, baked or plain model.
        example: the input, a tensor or a tuple of tensors; the program takes exactly
            these shapes (batch size included).
        int8: quantize weights and activations to int8.
        calibration: for ``int8``, an iterable of input batches (tensors, or tuples like
            ``example``), a few batches of real data; their batch size may differ from the
            example's.
        inplace: bake (shrink, fold) ``model`` itself instead of a copy.
        shrink: run ``surgery.shrink`` first (MobileNetV3).
        fold_batchnorm: run ``surgery.fold_batchnorm`` first.

    Returns:
        A :class:`Program`.

    Raises:
        TypeError: ``model`` is not a module, or ``example`` or a calibration batch is not
            a tensor or a tuple of tensors.
        ValueError: ``int8`` without calibration data or calibration without ``int8``; a
            model that cannot be baked, shrunk, captured or lowered (the message says why
            and what to do). ``model`` is left as it was unless ``inplace``.
        ModuleNotFoundError: ExecuTorch is not installed (the ``deploy`` extra).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain import FakeQuant, constrain
        >>> from torchconstrain.deploy import to_executorch
        >>> model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> _ = constrain(model, {nn.Linear: FakeQuant.xnnpack()})
        >>> program = to_executorch(model, torch.randn(1, 16), int8=True,
        ...                         calibration=[torch.randn(32, 16)])  # doctest: +SKIP
        >>> program.moved, program.size < 10_000  # doctest: +SKIP
        ({'0': 0, '2': 0}, True)
    """
    example = _inputs(example, "example")
    batches = _calibration(calibration, int8)
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_executorch: expected an nn.Module. Got {type(model).__name__}.")
    _import("executorch.exir")  # before any work: the extra is missing
    work = prepare(model, example[0], inplace=inplace, shrink=shrink, fold_batchnorm=fold_batchnorm)
    if not int8:
        return Program(_lower(_capture(work, example)), False, _shapes(example))
    quantized, moved = _quantize(work, example, batches)
    return Program(_lower(_capture(quantized, example)), True, _shapes(example), moved)


def prepare(model: nn.Module, example: Tensor | None = None, *, inplace: bool = False, shrink: bool = False,
            fold_batchnorm: bool = False) -> nn.Module:
    r"""Return the plain model :func:`to_executorch` exports: ``model`` (a copy, unless ``inplace``) on
    the CPU in eval mode, baked, then optionally shrunk (``example`` is the input its MACs
    are counted on, see :func:`surgery.shrink <torchconstrain.surgery.shrink>`) and with its
    BatchNorms folded (:func:`surgery.fold_batchnorm <torchconstrain.surgery.fold_batchnorm>`
    refuses a pair it cannot fold exactly).

    Example:
        >>> from torch import nn
        >>> from torchconstrain import NonNeg, constrain
        >>> from torchconstrain.deploy import prepare
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> _ = constrain(model, {"0.weight": NonNeg()})
        >>> [type(m).__name__ for m in prepare(model, fold_batchnorm=True)], type(model[0]).__name__
        (['Conv2d', 'Identity'], 'ParametrizedConv2d')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_executorch: expected an nn.Module. Got {type(model).__name__}.")
    work = model if inplace else copy.deepcopy(model)
    work.cpu().eval()
    bake(work)
    if shrink:
        surgery.shrink(work, example=example, measure=False)
    if fold_batchnorm:
        surgery.fold_batchnorm(work)
    return work


def _inputs(value, what: str) -> tuple[Tensor, ...]:
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not values or not all(isinstance(x, Tensor) for x in values):
        raise TypeError(f"to_executorch: {what}: expected a tensor or a tuple of tensors. Got {_describe(value)}.")
    return tuple(x.detach().cpu() for x in values)


def _describe(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {', '.join(type(x).__name__ for x in value) or 'nothing'}"
    return type(value).__name__


def _calibration(calibration, int8: bool) -> list[tuple[Tensor, ...]]:
    if not int8:
        if calibration is not None:
            raise ValueError("to_executorch: calibration data is only used with int8=True.")
        return []
    if calibration is None:
        raise ValueError("to_executorch: int8=True needs calibration data: pass calibration=[batch, ...], "
                         "a few batches of real inputs (activations are quantized from their ranges).")
    if isinstance(calibration, Tensor):
        raise TypeError(f"to_executorch: expected calibration as an iterable of input batches. Got one tensor of shape "
                        f"{tuple(calibration.shape)}, whose rows would each be taken for a batch: pass "
                        "list(inputs.split(32)), or [inputs] for one batch.")
    batches = [_inputs(batch, f"calibration batch {index}") for index, batch in enumerate(calibration)]
    if not batches:
        raise ValueError("to_executorch: calibration holds no batch; pass a few batches of real inputs.")
    return batches


def _shapes(inputs: tuple[Tensor, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(x.shape) for x in inputs)


def _capture(model: nn.Module, example: tuple[Tensor, ...], *, dynamic_batch: bool = False):
    """``torch.export`` the model, or a ``ValueError`` that says what to change."""
    try:
        if not dynamic_batch:
            return torch.export.export(model, example)
        pairs = tuple(torch.cat([x, x]) if x.dim() else x for x in example)  # a batch of 2: not specialised to 1
        dims = tuple({0: torch.export.Dim.AUTO} if x.dim() else None for x in example)
        return torch.export.export(model, pairs, dynamic_shapes=dims)
    except Exception as error:  # torch.export raises many types; the cause stays attached
        raise ValueError(
            f"to_executorch: torch.export cannot capture the model ({type(error).__name__}: {_first_line(error)}). "
            "Make its forward traceable for the example: no Python branches or loops on tensor values, no "
            "data-dependent shapes, plain tensors in and out; or export a submodule that is."
        ) from error


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def _lower(exported) -> bytes:
    exir = _import("executorch.exir")
    partitioner = _import("executorch.backends.xnnpack.partition.xnnpack_partitioner").XnnpackPartitioner
    try:
        return exir.to_edge_transform_and_lower(exported, partitioner=[partitioner()]).to_executorch().buffer
    except Exception as error:
        raise ValueError(
            f"to_executorch: ExecuTorch cannot lower the captured model ({type(error).__name__}: "
            f"{_first_line(error)}). An operator ExecuTorch has no kernel for must be replaced in the model."
        ) from error


def _quantize(model: nn.Module, example: tuple[Tensor, ...], batches: list) -> tuple[nn.Module, dict[str, int]]:
    """PT2E: capture, prepare with ``XNNPACKQuantizer``, calibrate, convert; and count the moved weights."""
    pt2e = _import("torchao.quantization.pt2e.quantize_pt2e")
    xnnpack = _import("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    quantizer = xnnpack.XNNPACKQuantizer().set_global(xnnpack.get_symmetric_quantization_config(is_per_channel=True))
    prepared = pt2e.prepare_pt2e(_capture(model, example, dynamic_batch=True).module(), quantizer)
    with torch.no_grad():
        for index, batch in enumerate(batches):
            try:
                prepared(*batch)
            except Exception as error:
                raise ValueError(
                    f"to_executorch: calibration batch {index} (shapes {list(_shapes(batch))}) does not run through "
                    f"the captured model, which takes inputs like {list(_shapes(example))} "
                    f"({type(error).__name__}: {_first_line(error)})."
                ) from error
    floats = _float_weights(prepared)
    converted = pt2e.convert_pt2e(prepared)
    return converted, _moved(converted, floats)


def _weight_nodes(graph_module):
    """``(module name, weight input node)`` of every conv and linear call in the graph."""
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and str(node.target) in _LINEAR_OPS and len(node.args) > 1:
            stack = node.meta.get("nn_module_stack") or {}
            name = list(stack.values())[-1][0] if stack else node.name
            yield name, node.args[1]


def _attribute(graph_module, target: str):
    value = graph_module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _float_weights(prepared) -> dict[str, Tensor]:
    """Before convert: each observed weight's float value, by module name."""
    weights = {}
    for name, node in _weight_nodes(prepared):
        if node.op == "call_module" and node.args and node.args[0].op == "get_attr":
            weights[name] = _attribute(prepared, node.args[0].target).detach().clone()
    return weights


def _moved(converted, floats: dict[str, Tensor]) -> dict[str, int]:
    """After convert: per quantized weight, the entries whose dequantized value is not the float one."""
    moved = {}
    for name, node in _weight_nodes(converted):
        if name in floats and node.op == "call_function" and "dequantize" in str(node.target):
            args = [_attribute(converted, a.target) if isinstance(a, torch.fx.Node) else a for a in node.args]
            moved[name] = int((node.target(*args) != floats[name]).sum())
    return moved

r"""Peak memory of each constraint variant: how much resident memory constraints add.

Model: ``Sequential`` of 8 ``Linear(2048, 2048)`` (bias included, float32), each followed
by ReLU, batch 8 of width 2048 (seed 0). ``W`` is the bytes of the 8 constrained weight
matrices, 8 x 2048 x 2048 x 4 = 128 MiB; numbers are given in ``W``.

Variants (per :mod:`benchmarks.variants`), on every Linear weight (biases untouched), set
up with ``torchconstrain.constrain(model, {nn.Linear: ...})``:

- ``plain``: no constraint (the baseline);
- ``Clamp``: ``Clamp(-1, 1)``; ``FixedMask``: ``FixedMask.magnitude(sparsity=0.5)``;
  ``LearnableMask (per channel)``: ``LearnableMask(per="channel")``; ``UnitNorm``:
  ``UnitNorm()``; ``FakeQuant``: ``FakeQuant(bits=8)``;
- ``mix``: ``[Clamp(-1, 1), FixedMask.magnitude(sparsity=0.5)]``;
- ``LearnableMask (per element)``: ``LearnableMask()``. Its scores are a learnable tensor of
  the weight's size, so training holds 1 W of scores, 1 W of their gradients and 2 W of
  their Adam state on top of the weight: it is measured but exempt from the targets;
- ``prune hooks``: ``torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.5)``
  on every Linear: the peer tool, the reference no variant should exceed.

Tasks:

- ``inference``: eval mode, under ``torch.no_grad()``, 3 forwards;
- ``training``: train mode, ``torch.optim.Adam(model.parameters(), lr=1e-3)``, 3 steps of
  ``zero_grad``, forward, MSE loss to a fixed random target, backward, ``step``
  (:func:`benchmarks.steps.train_step`).

How one number is taken (:func:`measure`):

1. Each variant and task runs in a process of its own, forked from a fork server
   (:func:`serve`, ``python -m benchmarks.memory --serve``): a fresh Python that has only
   imported torch, ``torch._dynamo`` (which the first optimizer step imports otherwise),
   torchconstrain and this module, and warmed up (below), its objects frozen (``gc.freeze``: the children's
   collections neither scan nor copy them). No measurement inherits another's heap, and
   none pays the seconds of those imports again. 1 torch thread.
2. glibc's mmap threshold is fixed at 1 MiB (``mallopt``): every tensor of 1 MiB or more
   gets pages of its own, given back to the system when it is freed, so resident memory
   follows the live tensors rather than which freed blocks malloc's heap happens to keep.
   With the default, adaptive threshold, plain's training peak moved by 0.5 W between
   identical runs, and Clamp's came out 0.66 W above plain's instead of 0.02 W.
3. The model is built, the variant applied, then ``gc.collect()`` and ``malloc_trim(0)``.
4. The process's high-water mark of resident memory (``VmHWM`` in ``/proc/self/status``)
   is reset to the current resident size by writing ``5`` to ``/proc/self/clear_refs``, so
   that temporaries of construction (``FixedMask.magnitude`` sorting every weight) are not
   counted: what the model holds after construction is resident and counts, what it
   freed does not. Where the reset is refused (not Linux), the peak is
   ``getrusage(RUSAGE_SELF).ru_maxrss`` instead, construction included, and the table
   says so.
5. The task runs; the peak is ``VmHWM`` after it.

Everything resident counts: tensors, and also torch's code pages and one-time state. The
fork server runs every variant and task once on a tiny model before forking, and each
measuring process again before it builds its model (:func:`_warm_up`), so those are
resident in every measuring process alike, plain's included (without it, the code of
``constrain()``'s path added about 8 MiB to every constrained variant, whatever the
model's size: 0.06 W here).

Reported: ``(peak(variant, task) - peak(plain, task)) / W``, "+x.xx W over plain": what
the variant adds to the same process's peak, everything else (Python, torch, the model's
own weights, gradients, Adam state of plain parameters) being the same. ``plain``'s row
gives its absolute peaks in MiB. Targets: at most +1.3 W in inference, +1.5 W in training,
and never above ``prune hooks`` in the same task.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import platform
import re
import resource
import select
import signal
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, TextIO

import torch
from torch import nn
from torch.nn.utils import parametrize

from benchmarks import steps, variants
from torchconstrain import Clamp, FakeQuant, FixedMask, LearnableMask, UnitNorm

SECTION = "memory"
NAME = "peak memory"  # what ``--case`` matches
TASKS = ("inference", "training")
TARGETS_W = {"inference": 1.3, "training": 1.5}
REFERENCE = "prune hooks"
EXEMPT = ("LearnableMask (per element)",)
MMAP_THRESHOLD = 2**20
# What the fork server imports besides this module (torch, torchconstrain): what the first
# optimizer step would import (a second and ~180 MiB in every training process).
PRELOAD = ("torch._dynamo",)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
REPLY_TIMEOUT_S = 600  # one measurement of the full model takes seconds
KIB = 1024
MIB = 2**20


@dataclass(frozen=True)
class Setup:
    r"""The model (``layers`` x ``Linear(width, width)``), batch size, and the number of
    forwards (inference) or optimizer steps (training) a task runs."""

    layers: int
    width: int
    batch: int
    calls: int

    @property
    def name(self) -> str:
        return f"{self.layers} x Linear({self.width},{self.width}) b{self.batch}"

    @property
    def weight_bytes(self) -> int:
        r"""``W``: the bytes of the float32 weight matrices the variants constrain."""
        return self.layers * self.width * self.width * 4


FULL = Setup(layers=8, width=2048, batch=8, calls=3)
QUICK = Setup(layers=2, width=256, batch=8, calls=1)  # ``--quick``: a smoke test of the machinery


def _rules(make: Callable[[], object]) -> Callable[[], dict]:
    return lambda: {nn.Linear: make()}


VARIANTS = (
    variants.plain(),
    variants.constrained("Clamp", _rules(lambda: Clamp(-1, 1))),
    variants.constrained("FixedMask", _rules(lambda: FixedMask.magnitude(sparsity=0.5))),
    variants.constrained("LearnableMask (per channel)", _rules(lambda: LearnableMask(per="channel"))),
    variants.constrained("LearnableMask (per element)", _rules(LearnableMask)),
    variants.constrained("UnitNorm", _rules(UnitNorm)),
    variants.constrained("FakeQuant", _rules(lambda: FakeQuant(bits=8))),
    variants.constrained("mix", _rules(lambda: [Clamp(-1, 1), FixedMask.magnitude(sparsity=0.5)])),
    variants.pruned(REFERENCE, (nn.Linear,), amount=0.5),
)
_VARIANTS_BY_NAME = {variant.name: variant for variant in VARIANTS}


# -- in the measuring process ---------------------------------------------------------------


def measure(setup: Setup, variant: str, task: str) -> dict:
    r"""Build, apply ``variant``, reset the peak, run ``task``; sizes in KiB. Meant for a
    fresh process (:meth:`ForkServer.measure`): it changes the process's allocator
    settings and thread count."""
    torch.set_num_threads(1)
    allocator = _fix_mmap_threshold()
    _warm_up()  # the code pages every variant runs, mapped into this process too (see _warm_up)
    before_build = _status_kib("VmRSS")
    model, x, target = _build(setup)
    _VARIANTS_BY_NAME[variant].prepare(model)
    gc.collect()
    _trim_heap()
    build_peak = _status_kib("VmHWM")
    resident = _status_kib("VmRSS")
    reset = _reset_peak()
    TASK_RUNS[task](model, x, target, setup.calls)
    return {
        "variant": variant,
        "task": task,
        "pid": os.getpid(),
        "peak_kib": _status_kib("VmHWM") if reset else _ru_maxrss_kib(),
        "resident_kib": resident,
        "build_peak_kib": build_peak,
        "before_build_kib": before_build,
        "peak_source": "VmHWM after reset" if reset else "ru_maxrss, construction included",
        "allocator": allocator,
        "weight_bytes": sum(_stored_weight(m).nbytes for m in _linears(model)),
        "constrained": sum(_is_constrained(m) for m in _linears(model)),
    }


def _build(setup: Setup) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(setup.layers) for m in (nn.Linear(setup.width, setup.width), nn.ReLU())])
    return model, torch.randn(setup.batch, setup.width), torch.randn(setup.batch, setup.width)


def _inference(model: nn.Module, x: torch.Tensor, target: torch.Tensor, calls: int) -> None:
    model.eval()
    with torch.no_grad():
        for _ in range(calls):
            model(x)


def _training(model: nn.Module, x: torch.Tensor, target: torch.Tensor, calls: int) -> None:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = steps.train_step(model, x, steps.mse_backward(target), optimizer)
    for _ in range(calls):
        step()


TASK_RUNS = {"inference": _inference, "training": _training}


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _is_constrained(linear: nn.Linear) -> bool:
    r"""A parametrization (torchconstrain) or a pruning hook (``weight_orig``) on the weight."""
    return parametrize.is_parametrized(linear, "weight") or hasattr(linear, "weight_orig")


def _stored_weight(linear: nn.Linear) -> torch.Tensor:
    r"""The weight tensor the module stores: the original under a constraint or pruning."""
    if parametrize.is_parametrized(linear, "weight"):
        return linear.parametrizations.weight.original
    return getattr(linear, "weight_orig", linear.weight)


def _status_kib(field: str) -> int:
    r"""A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``); 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


def _reset_peak() -> bool:
    r"""Reset ``VmHWM`` to the current resident size; whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    resident = _status_kib("VmRSS")
    return 0 < _status_kib("VmHWM") <= resident + 1024  # a page or two may be touched in between


def _ru_maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None


def _fix_mmap_threshold() -> str:
    r"""Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (see the module docstring)."""
    libc = _libc()
    if libc is None or libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return "default"
    return f"glibc, mmap threshold {MMAP_THRESHOLD // KIB} KiB"


def _trim_heap() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def serve(requests: TextIO, replies: TextIO) -> None:
    r"""The fork server: for each request line (JSON ``{"setup": ..., "variant": ..., "task":
    ...}``), fork a process that runs :func:`measure` and sends back its row; write the row,
    or ``{"error": ...}``, as one JSON line to ``replies``."""
    for module in PRELOAD:
        importlib.import_module(module)
    _warm_up()
    gc.freeze()  # the children's ``gc.collect()`` skips (and does not copy) what was imported
    for line in requests:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the measuring process
            os.close(read_end)
            _measure_and_exit(request, write_end)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            reply = pipe.read()
        _, status = os.waitpid(pid, 0)
        died = json.dumps({"error": f"the measuring process died (wait status {status})"})
        replies.write((reply or died) + "\n")
        replies.flush()


def _warm_up() -> None:
    r"""Run every variant and task once on a tiny model, so that the code pages and
    one-time state their operations touch first count in every measuring process alike
    (plain's included), instead of against the variant that touches them.

    The server runs it once (one-time state, imports), and each forked process again: a
    forked process does not inherit the page-table entries of shared libraries' code, so
    the first call into a kernel maps its pages into that process's resident memory
    (about 8 MiB for ``constrain``'s path, whatever the model's size)."""
    tiny = Setup(layers=2, width=64, batch=2, calls=1)
    for variant in VARIANTS:
        for run_task in TASK_RUNS.values():
            model, x, target = _build(tiny)
            variant.prepare(model)
            run_task(model, x, target, tiny.calls)
    gc.collect()


def _measure_and_exit(request: dict, write_end: int) -> None:
    try:
        reply = json.dumps(measure(Setup(**request["setup"]), request["variant"], request["task"]))
    except BaseException:
        reply = json.dumps({"error": traceback.format_exc()})
    with os.fdopen(write_end, "w") as pipe:
        pipe.write(reply)
    os._exit(0)


# -- in the calling process -----------------------------------------------------------------


class ForkServer:
    r"""``python -m benchmarks.memory --serve`` in a subprocess (a session of its own), as a
    context manager; :meth:`measure` runs one measurement in a process forked from it."""

    def __enter__(self) -> "ForkServer":
        root = str(Path(__file__).resolve().parent.parent)  # where ``benchmarks`` is importable
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.memory", "--serve"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=dict(os.environ, PYTHONPATH=path), start_new_session=True)
        return self

    def measure(self, setup: Setup, variant: str, task: str) -> dict:
        r""":func:`measure` in a fresh process; its row."""
        self.process.stdin.write(json.dumps({"setup": asdict(setup), "variant": variant, "task": task}) + "\n")
        self.process.stdin.flush()
        if not select.select([self.process.stdout], [], [], REPLY_TIMEOUT_S)[0]:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and its measuring process
            raise RuntimeError(f"{variant}, {task}: no reply from the fork server in {REPLY_TIMEOUT_S} s")
        reply = json.loads(self.process.stdout.readline() or '{"error": "the fork server died"}')
        if "error" in reply:
            raise RuntimeError(f"{variant}, {task}: {reply['error']}")
        return reply

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()
        self.process.wait()
        self.process.stdout.close()


def run(setup: Setup = FULL, progress: Callable[[dict], None] | None = None) -> dict:
    r"""Measure every variant and task, one fresh process each; the rows with their peaks
    over plain in ``W``, the verdict on the targets per variant, and the setup."""
    rows = []
    with ForkServer() as server:
        for variant in VARIANTS:
            for task in TASKS:
                rows.append(server.measure(setup, variant.name, task))
                if progress is not None:
                    progress(rows[-1])
    return summarize(setup, rows)


def summarize(setup: Setup, rows: list[dict]) -> dict:
    r"""Add each row's peak and resident size over plain's in ``W`` (``peak_over_plain_W``,
    ``resident_over_plain_W``); a JSON-ready result with the verdicts on the targets."""
    wrong = sorted({r["variant"] for r in rows if r["weight_bytes"] != setup.weight_bytes})
    if wrong:
        raise ValueError(f"the weights of {wrong} are not W = {setup.weight_bytes} bytes")
    plain = {r["task"]: r for r in rows if r["variant"] == "plain"}
    for row in rows:
        for size in ("peak", "resident"):
            extra = row[f"{size}_kib"] - plain[row["task"]][f"{size}_kib"]
            row[f"{size}_over_plain_W"] = extra * KIB / setup.weight_bytes
    result = {"model": setup.name, "setup": asdict(setup), "W_bytes": setup.weight_bytes, "tasks": list(TASKS),
              "targets_W": TARGETS_W, "reference": REFERENCE, "exempt": list(EXEMPT), "rows": rows}
    result["verdicts"] = {v.name: verdict(result, v.name) for v in VARIANTS}
    return result


def verdict(result: dict, variant: str) -> str:
    r"""``yes``, or ``no:`` and the targets missed; ``–`` for plain, ``reference``, ``exempt``."""
    if variant == "plain":
        return "–"
    if variant == result["reference"]:
        return "reference"
    if variant in result["exempt"]:
        return "exempt"
    over, reference = _peaks_shown(result, variant), _peaks_shown(result, result["reference"])
    missed = [f"{task} > {result['targets_W'][task]:g} W" for task in result["tasks"]
              if over[task] > result["targets_W"][task]]
    missed += [f"{task} above {result['reference']}" for task in result["tasks"] if over[task] > reference[task]]
    return "yes" if not missed else "no: " + ", ".join(missed)


def _peaks_shown(result: dict, variant: str) -> dict[str, float]:
    r"""A variant's peak over plain per task, in ``W`` to the two decimals the table shows."""
    return {r["task"]: round(r["peak_over_plain_W"], 2) for r in result["rows"] if r["variant"] == variant}


# -- the report -----------------------------------------------------------------------------


def markdown(result: dict) -> list[str]:
    r"""The memory section of the report: title, table, and what was measured."""
    cell = {(r["variant"], r["task"]): r for r in result["rows"]}
    tasks = result["tasks"]
    header = ["variant", "resident after setup", *(f"{task} peak" for task in tasks), "targets met"]
    lines = [_row(header), _row(["---", "---:", *("---:" for _ in tasks), "---"])]
    for variant in dict.fromkeys(r["variant"] for r in result["rows"]):
        rows = [cell[variant, task] for task in tasks]
        if variant == "plain":
            sizes = [_mib(rows[0]["resident_kib"])] + [_mib(r["peak_kib"]) for r in rows]
        else:
            sizes = [_w(rows[0]["resident_over_plain_W"])] + [_w(r["peak_over_plain_W"]) for r in rows]
        lines.append(_row([variant, *sizes, result["verdicts"][variant]]))
    title = f"## Peak memory: {result['model']}, over plain in W = {result['W_bytes'] / MIB:g} MiB of weights"
    return ["", title, ""] + lines + ["", notes(result)]


def notes(result: dict) -> str:
    r"""What the table's numbers are, the targets, and the exemption."""
    first, setup, targets = result["rows"][0], result["setup"], result["targets_W"]
    exempt = ", ".join(f"`{name}`" for name in result["exempt"])
    sentences = [
        f"Each variant and task measured once, in a process of its own forked from a fresh Python, 1 torch "
        f"thread, allocator: {first['allocator']}.",
        f"Peak: {first['peak_source']}, the high-water mark of resident memory reset once the model was built "
        f"and constrained (construction's temporaries are not counted, what it keeps is), read after the task.",
        f"`plain` shows absolute MiB ({_mib(first['before_build_kib'])} of them the Python and torch process "
        f"before the model was built); every other cell is (variant - plain) / W in the same task.",
        "*resident after setup*: resident memory once the model is built and constrained (in the inference "
        "process).",
        f"Inference: eval mode, `torch.no_grad()`, {setup['calls']} forward(s) of a batch of {setup['batch']}; "
        f"training: train mode, Adam (lr 1e-3), {setup['calls']} step(s) of zero_grad, forward, MSE to a fixed "
        f"target, backward, step.",
        f"Targets: inference ≤ +{targets['inference']:g} W, training ≤ +{targets['training']:g} W, and never "
        f"above `{result['reference']}` in the same task.",
        f"{exempt} is exempt: its scores are a learnable tensor of the weight's size, so it holds 1 W of "
        f"scores, and training 1 W of their gradients and 2 W of their Adam state besides, by design.",
    ]
    return " ".join(sentences)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def progress_line(row: dict) -> str:
    return f"  {SECTION:6} | {NAME:28} | {row['task']:10} | {row['variant']:27} | {_mib(row['peak_kib']):>9}"


def _mib(kib: int) -> str:
    return f"{kib / KIB:.0f} MiB"


def _w(value: float) -> str:
    return f"{value:+.2f} W"


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        sys.exit("usage: python -m benchmarks.memory --serve (started by benchmarks.memory.run; "
                 "for the table, run python benchmarks/run.py --case 'peak memory')")
    serve(sys.stdin, sys.stdout)

r"""The demo's outputs: ``metrics.json``, ``report.md`` and the summary printed on stdout."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from torchconstrain.demo.data import BN_MOMENTUM

__all__ = ["LABELS", "summary", "write"]

#: Display names of the stages, in order.
LABELS = {"plain": "plain", "constrained": "constrained", "baked": "baked", "shrunk": "shrunk + folded",
          "executorch_fp32": "ExecuTorch fp32", "executorch_int8": "ExecuTorch int8"}


def write(out: Path, metrics: dict, before: dict[str, Tensor], after: dict[str, Tensor]) -> list[Path]:
    r"""Write ``metrics.json``, the PNG plots and ``report.md`` into ``out`` (created if missing).

    Returns:
        The written paths.
    """
    from torchconstrain.demo import plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    pictures = plots.write(out, metrics, before, after)
    (out / "report.md").write_text(markdown(metrics, [path.name for path in pictures]))
    return [out / "report.md", out / "metrics.json", *pictures]


def stage_rows(metrics: dict) -> list[list[str]]:
    r"""One row per stage: name, test accuracy, zero weights, params, MACs, file size, latency.

    The ExecuTorch programs run the shrunk, folded network: its params and MACs."""
    rows = []
    latency = metrics["timing"]["latency_ms"]
    for name, label in LABELS.items():
        if name in metrics["stages"]:
            stage = metrics["stages"][name]
            network = metrics["stages"]["shrunk"] if name.startswith("executorch") else stage
            zeros = "" if "sparsity" not in stage else f"{stage['sparsity']:.1%}"
            rows.append([label, f"{stage['test_accuracy']:.1%}", zeros, f"{network['params'] / 1e6:.2f} M",
                         f"{network['macs'] / 1e6:.2f} M", _megabytes(stage["size_bytes"]), f"{latency[name]:.2f} ms"])
    return rows


def comparison_rows(metrics: dict) -> list[list[str]]:
    r"""The shrunk model, and the int8 program if there is one, relative to the plain model."""
    stages, latency = metrics["stages"], metrics["timing"]["latency_ms"]
    plain = stages["plain"]
    rows = []
    for name, label in (("shrunk", "shrunk vs plain"), ("executorch_int8", "int8 program vs plain")):
        if name in stages:
            stage = stages[name]
            network = stages["shrunk"]
            points = 100 * (stage["test_accuracy"] - plain["test_accuracy"])
            rows.append([label, f"{points:+.1f} pt", "", f"{network['params'] / plain['params']:.2f}x",
                         f"{network['macs'] / plain['macs']:.2f}x", f"{stage['size_bytes'] / plain['size_bytes']:.2f}x",
                         f"{latency[name] / latency['plain']:.2f}x"])
    return rows


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


HEADER = ["stage", "test acc", "zero weights", "params", "MACs", "size", "latency"]


def summary(metrics: dict, files: list[Path]) -> str:
    r"""The compact table printed at the end of a run."""
    data, settings = metrics["data"], metrics["settings"]
    rows, comparisons = stage_rows(metrics), comparison_rows(metrics)
    widths = [max(len(row[i]) for row in [HEADER, *rows, *comparisons]) for i in range(len(HEADER))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    lines = [
        f"MobileNetV3-Small on 8x8 digits at {data['image_size']}x{data['image_size']} ({data['train_images']} train / "
        f"{data['test_images']} test), {_count(settings['epochs'], 'epoch')}, seed {settings['seed']}, "
        f"{settings['device']}",
        f"rules: {settings['rules']} ({_count(len(metrics['constraints']), 'tensor')} constrained)",
        "",
        line(HEADER),
        *(line(row) for row in rows),
        line(["-" * w for w in widths]),
        *(line(row) for row in comparisons),
        f"latency: batch 1, one CPU thread ({_folding_note(metrics)}){_executorch_note(metrics)}",
        "",
        *_verdicts(metrics),
        f"report: {files[0]} (+ {', '.join(path.name for path in files[1:])})" if files else "",
    ]
    return "\n".join(lines).rstrip()


def _folding_note(metrics: dict) -> str:
    latency = metrics["timing"]["latency_ms"]
    return f"BatchNorm folding alone: {latency['folded']:.2f} ms, {latency['folded'] / latency['plain']:.2f}x"


def _executorch_note(metrics: dict) -> str:
    count = metrics["timing"].get("executorch_threads")
    if count is None:
        return ""
    return f"; ExecuTorch programs: XNNPACK, {count} thread{'' if count == 1 else 's'}"


def _program_verdicts(metrics: dict) -> list[str]:
    check, stages = metrics["verification"], metrics["stages"]
    if "executorch_fp32" not in stages:
        return []
    verdict = "ok" if check["executorch_fp32_matches_shrunk"] else "MISMATCH"
    points = 100 * (stages["executorch_int8"]["test_accuracy"] - stages["executorch_fp32"]["test_accuracy"])
    within = "within" if abs(points) <= 1 else "MORE than"
    return [
        f"ExecuTorch fp32 vs shrunk + folded outputs: max |difference| "
        f"{check['executorch_fp32_vs_shrunk_max_abs_difference']:.2g} ({verdict}, "
        + ", ".join(f"{key}={value:g}" for key, value in check["executorch_tolerance"].items()) + ")",
        f"ExecuTorch int8 vs fp32 test accuracy: {points:+.1f} pt ({within} 1 point); "
        f"{stages['executorch_int8']['quantized_weights']} weights int8 per channel, activations calibrated on "
        f"{min(metrics['settings']['calibration_images'], metrics['data']['train_images'])} training images",  # all there are
    ]


def _verdicts(metrics: dict) -> list[str]:
    check = metrics["verification"]
    history = metrics["history"]["constrained"]
    lines = [f"check: {history[-1]['checked_tensors'] if history else 0} constrained tensors held after each of "
             f"{_count(check['check_passed_epochs'], 'epoch')}"]
    if metrics["blocks"]:
        before = sum(block["before"] for block in metrics["blocks"].values())
        after = sum(block["after"] for block in metrics["blocks"].values())
        groups, channels = group_nouns(metrics["blocks"])
        lines.append(f"shrink: {len(metrics['blocks'])} {groups}, {channels} {before:,} -> {after:,}; "
                     f"{check['folded_batchnorms']} BatchNorms folded")
    lines += [f"budget: {name} target {target:.3f}, achieved {achieved:.3f}"
              for name, (target, achieved) in metrics.get("targets", {}).items()]
    lines.append(f"baked vs constrained outputs: max |difference| {check['baked_vs_constrained_max_abs_difference']:.2g}")
    verdict = "ok" if check["shrunk_matches_baked"] else "MISMATCH"
    tolerance = ", ".join(f"{key}={value:g}" for key, value in check["tolerance"].items())
    lines.append(f"shrunk + folded vs baked outputs: max |difference| {check['shrunk_vs_baked_max_abs_difference']:.2g} "
                 f"({verdict}, {tolerance})")
    return lines + _program_verdicts(metrics)


def group_nouns(groups: dict) -> tuple[str, str]:
    r"""How to name the shrunk channel groups: ``("blocks", "expanded channels")`` when every
    group is a block's expanded channels (named after the block), else ``("channel groups", "channels")``."""
    if all(":" not in name for name in groups):
        return "blocks", "expanded channels"
    return "channel groups", "channels"


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def markdown(metrics: dict, pictures: list[str]) -> str:
    r"""The text of ``report.md``."""
    parts = [
        "# torchconstrain demo\n",
        _setup(metrics),
        "## Stages\n",
        _table(HEADER, stage_rows(metrics) + comparison_rows(metrics)),
        _stage_notes(metrics),
        "## Checks\n",
        "\n".join(f"- {line}" for line in _verdicts(metrics)) + "\n"
        + f"- the baked `state_dict` loads into a freshly built model with `strict=True`; max |difference| of "
          f"the outputs: {metrics['verification']['stock_load_max_abs_difference']:.2g}\n",
        "## Training\n",
        _history_table(metrics),
        *(f"![{name}]({name})\n" for name in pictures),
        "## Constraints\n",
        f"The report of `constrain(model, path)` for `{metrics['settings']['rules']}`, with each tensor's share of "
        "zeros after `bake`.\n",
        _constraint_table(metrics["constraints"]),
    ]
    if metrics["blocks"]:
        rows = [[name, str(b["before"]), f"{b['after']} ({b['after'] / b['before']:.0%})"]
                for name, b in metrics["blocks"].items()]
        groups, channels = group_nouns(metrics["blocks"])
        title = "Block channels" if groups == "blocks" else "Channel groups"
        parts += [f"## {title} after `surgery.shrink`\n", _table([groups[:-1].split()[-1], channels, "kept"], rows)]
    return "\n".join(parts)


def _setup(metrics: dict) -> str:
    s, data = metrics["settings"], metrics["data"]
    return (
        f"`torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)` with the stem conv's stride set to 1 "
        f"and BatchNorm momentum {BN_MOMENTUM}, trained on scikit-learn's 8x8 digits upsampled to "
        f"{data['image_size']}x{data['image_size']} ({data['train_images']} train / {data['test_images']} test images, "
        f"stratified split by seed {s['seed']}). Both models start from the same weights and see the same batches: "
        f"{s['epochs']} epochs, batch {s['batch_size']}, AdamW (lr {s['lr']:g}, weight decay {s['weight_decay']:g}, "
        f"one-cycle schedule) on `cross_entropy + penalty(model)`; the learnable mask scores have their own group "
        f"(lr {s['mask_lr']:g}, no weight decay), their temperature is annealed to {s['mask_temperature']:g}, and "
        f"the gates are hard (binary, straight-through gradient) for the last {s['hard_epochs']} epochs, so the "
        f"trained network is the one `bake` leaves. "
        f"Device: {s['device']}. Rules: `{s['rules']}`.\n"
    )


def _stage_notes(metrics: dict) -> str:
    timing = metrics["timing"]
    return (
        "Test accuracy on the held-out images. *zero weights*: the share of exactly zero entries among the "
        "(effective) weights of every conv and linear layer. *params* of the constrained model count the stored "
        "originals and the mask scores. *MACs*: multiply-accumulates of one image. *latency*: batch-1 CPU inference "
        f"on {timing['latency_threads']} thread, `torch.utils.benchmark` medians in interleaved rounds, the fastest "
        "round. *shrunk + folded* is the baked model after "
        "`surgery.shrink` (block channels whose gates fell to 0 removed) and `surgery.fold_batchnorm`; "
        f"{_folding_note(metrics)} (the baked model with BatchNorm folded, nothing removed). *size*: the "
        "file of `torch.save(model.state_dict())`, or of the `.pte` program. "
        f"{_program_note(metrics)}\n\n"
        f"Wall time ({timing['training_threads']} training threads): plain training "
        f"{timing['seconds']['plain_training']:.0f} s, constrained training "
        f"{timing['seconds']['constrained_training']:.0f} s, "
        + (f"ExecuTorch export {timing['seconds']['executorch_export']:.0f} s, "
           if "executorch_export" in timing["seconds"] else "")
        + "everything up to writing this report "
        f"{timing['seconds']['total']:.0f} s.\n"
    )


def _program_note(metrics: dict) -> str:
    if "executorch_fp32" not in metrics["stages"]:
        return ""
    return ("*ExecuTorch fp32* and *int8* are the shrunk and folded model exported with "
            "`torchconstrain.deploy.to_executorch` for XNNPACK (int8: PT2E with `XNNPACKQuantizer`, weights per "
            "channel, activations per tensor) and run one image at a time in ExecuTorch's runtime, latency on "
            f"{metrics['timing']['executorch_threads']} XNNPACK thread(s).")


def _history_table(metrics: dict) -> str:
    plain, constrained = metrics["history"]["plain"], metrics["history"]["constrained"]
    header = ["epoch", "plain loss", "plain test acc", "constrained loss", "penalty", "constrained test acc", "gates kept"]
    rows = [[str(p["epoch"]), f"{p['train_loss']:.3f}", f"{p['test_accuracy']:.1%}", f"{c['train_loss']:.3f}",
             f"{c['penalty']:.3f}", f"{c['test_accuracy']:.1%}",
             "" if c.get("gates_kept") is None else f"{c['gates_kept']:.0%}"] for p, c in zip(plain, constrained)]
    return "Loss: training cross-entropy, mean over the epoch.\n\n" + _table(header, rows)


def _constraint_table(rows: list[dict]) -> str:
    cells = [[f"`{row['tensor']}`", "x".join(map(str, row["shape"])), " > ".join(row["constraints"]), row["rules"],
              "" if row["sparsity_after_bake"] is None else f"{row['sparsity_after_bake']:.1%}"] for row in rows]
    return _table(["tensor", "shape", "constraints", "rules", "zeros after bake"], cells, left=4)


def _table(header: list[str], rows: list[list[str]], *, left: int = 1) -> str:
    """A Markdown table; columns from ``left`` on are right-aligned (numbers)."""
    rule = "|" + "".join(" --- |" if i < left else " ---: |" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"

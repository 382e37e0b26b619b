r"""The main job behind ``torchconstrain demo``: MobileNetV3-Small on digits, plain and constrained.

:func:`run_demo` trains torchvision's ``mobilenet_v3_small`` on scikit-learn's 8x8
handwritten digits twice from the same weights, once plain and once under a rules file
(default: the packaged ``torchconstrain/data/demo_rules.yaml``), then bakes, shrinks and
folds the constrained model and writes a report folder. Nothing is downloaded.

Modules: ``config`` (settings), ``data`` (digits, model), ``train`` (the loop),
``stages`` (bake, shrink, measure), ``report`` (JSON, Markdown, summary), ``plots``.
"""

from torchconstrain.demo.config import DemoConfig, default_rules_path
from torchconstrain.demo.pipeline import DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "default_rules_path", "run_demo"]

r"""Architecture-neutral layer surgery: keep some channels of a conv, BatchNorm or linear layer; fold BN.

The pieces an architecture's surgery is built from (see :mod:`torchconstrain.surgery.mobilenetv3`):
each function returns a new layer or changes a ``Sequential`` in place, and none knows
which block or model the layer belongs to. A *conv/BN sequence* is a ``Sequential`` whose
first two modules are a ``Conv2d`` and a ``BatchNorm2d`` (torchvision's
``Conv2dNormActivation``, or a plain ``nn.Sequential``); channel indices are 1-D integer
tensors, in increasing order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, skip_init

from torchconstrain._tensors import module_hooks
from torchconstrain.constraints import Constraint

__all__ = [
    "conv_of", "fold_batchnorm", "input_l1", "not_resizable", "resize_like", "slice_outputs", "sliced_bn", "sliced_conv",
    "sliced_linear",
]

#: What slicing changes in each layer type: its size attributes, and the tensors it holds.
_LAYERS = (
    (nn.Conv2d, ("in_channels", "out_channels", "groups"), {"weight", "bias"}),
    (nn.Linear, ("in_features", "out_features"), {"weight", "bias"}),
    (nn.BatchNorm2d, ("num_features",), {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}),
)


def conv_of(layer: nn.Module) -> nn.Conv2d:
    r"""Return the ``Conv2d`` a conv/BN/activation sequence starts with.

    Raises:
        ValueError: ``layer`` is not a ``Sequential`` starting with a ``Conv2d``.
    """
    conv = layer[0] if isinstance(layer, nn.Sequential) and len(layer) else None
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"expected a conv/BN/activation sequence starting with a Conv2d. Got {layer!r}.")
    return conv


def input_l1(layer: nn.Conv2d | nn.Linear) -> Tensor:
    r"""Return the L1 norm of the weights reading each input channel of ``layer`` (zero: unread).

    Example:
        >>> from torch import nn
        >>> from torchconstrain.surgery.slicing import input_l1
        >>> layer = nn.Linear(3, 2)
        >>> _ = nn.init.zeros_(layer.weight[:, 1])
        >>> (input_l1(layer) == 0).tolist()
        [False, True, False]
    """
    with torch.no_grad():
        weight = layer.weight
        return weight.abs().sum(dim=[d for d in range(weight.dim()) if d != 1])


def sliced_conv(conv: nn.Conv2d, *, rows: Tensor | None = None, columns: Tensor | None = None,
                depthwise: bool = False) -> nn.Conv2d:
    r"""Return a new ``Conv2d`` with only output channels ``rows`` and input channels ``columns``.

    ``None`` keeps every channel on that side. A ``depthwise`` conv (``groups`` equal to its
    channels) keeps that property: slicing its outputs slices its inputs and ``groups``.
    The new conv is on the same device, with the same dtype and training mode; ``conv`` is
    unchanged.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain.surgery.slicing import sliced_conv
        >>> conv = sliced_conv(nn.Conv2d(4, 6, 3), rows=torch.tensor([0, 5]), columns=torch.tensor([1, 2, 3]))
        >>> conv.in_channels, conv.out_channels
        (3, 2)
    """
    weight, bias = _sliced_weight_and_bias(conv, rows, columns)
    out_channels = weight.shape[0]
    in_channels = out_channels if depthwise else weight.shape[1] * conv.groups
    new = skip_init(nn.Conv2d, in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    groups=out_channels if depthwise else conv.groups, bias=bias is not None,
                    padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
    _copy_parameters(new, weight, bias, conv)
    return new.train(conv.training)


def _copy_parameters(new: nn.Module, weight: Tensor, bias: Tensor | None, old: nn.Module) -> None:
    """Copy the sliced ``weight`` and ``bias`` into ``new``, in ``old``'s weight's memory
    format (channels-last stays) and frozen where ``old``'s were."""
    with torch.no_grad():
        if _channels_last(old.weight):
            new.weight.data = new.weight.data.contiguous(memory_format=torch.channels_last)
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    _keep_frozen(new, old)


def _channels_last(weight: Tensor) -> bool:
    """Whether a 4-D ``weight`` is laid out channels-last (and not also plainly contiguous)."""
    return weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def _keep_frozen(new: nn.Module, old: nn.Module) -> None:
    """Give ``new``'s parameters the ``requires_grad`` of ``old``'s of the same name."""
    for name, parameter in new.named_parameters(recurse=False):
        kept = getattr(old, name, None)
        if isinstance(kept, Tensor):
            parameter.requires_grad_(kept.requires_grad)


def _sliced_weight_and_bias(module: nn.Module, rows: Tensor | None, columns: Tensor | None):
    """``module``'s weight with only output channels ``rows`` and input channels ``columns``
    (``None``: all), and its bias with only ``rows`` (``None`` when it has none); detached."""
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
        bias = None if bias is None else bias.index_select(0, rows.to(weight.device))
    if columns is not None:
        weight = weight.index_select(1, columns.to(weight.device))
    return weight, bias


def sliced_bn(bn: nn.BatchNorm2d, index: Tensor) -> nn.BatchNorm2d:
    r"""Return a new ``BatchNorm2d`` with only the channels ``index``: affine parameters and running statistics."""
    like = next((t for t in (bn.weight, bn.running_mean) if t is not None), None)  # its device and dtype
    factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
    new = nn.BatchNorm2d(len(index), bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **factory)
    state = {name: value.index_select(0, index.to(value.device)) if value.dim() else value
             for name, value in bn.state_dict().items()}
    new.load_state_dict(state)
    _keep_frozen(new, bn)
    return new.train(bn.training)


def sliced_linear(linear: nn.Linear, *, rows: Tensor | None = None, columns: Tensor | None = None) -> nn.Linear:
    r"""Return a new ``Linear`` with only output features ``rows`` and input features ``columns``.

    ``None`` keeps every feature on that side; ``linear`` is unchanged.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain.surgery.slicing import sliced_linear
        >>> sliced_linear(nn.Linear(4, 3), columns=torch.tensor([0, 2]))
        Linear(in_features=2, out_features=3, bias=True)
    """
    weight, bias = _sliced_weight_and_bias(linear, rows, columns)
    new = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    _copy_parameters(new, weight, bias, linear)
    return new.train(linear.training)


def slice_outputs(layer: nn.Sequential, index: Tensor, *, depthwise: bool = False) -> None:
    r"""Keep only the output channels ``index`` of a conv/BN sequence: its conv and its BatchNorm.

    Modifies ``layer``'s conv and BatchNorm in place (:func:`resize_like`; the activation
    after them, if any, stays). ``depthwise`` as in :func:`sliced_conv`.
    """
    conv = conv_of(layer)
    resize_like(conv, sliced_conv(conv, rows=index, depthwise=depthwise))
    resize_like(layer[1], sliced_bn(layer[1], index))


def resize_like(layer: nn.Module, resized: nn.Module) -> nn.Module:
    r"""Give ``layer`` the tensors and sizes of ``resized``, its copy from :func:`sliced_conv`,
    :func:`sliced_bn` or :func:`sliced_linear`; return ``layer``.

    ``layer`` stays the same object: its class (a subclass's ``forward``), hooks and other
    attributes stay, and every module holding it sees the new sizes. A layer that holds
    more than the tensors of its type (see :func:`not_resizable`) is refused.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain.surgery.slicing import resize_like, sliced_linear
        >>> layer = nn.Linear(4, 3)
        >>> handle = layer.register_forward_hook(lambda module, inputs, output: print(tuple(output.shape)))
        >>> _ = resize_like(layer, sliced_linear(layer, rows=torch.tensor([0, 2])))
        >>> _ = layer(torch.zeros(1, 4))
        (1, 2)
    """
    reason = not_resizable(layer)
    if reason is None and parametrize.is_parametrized(layer):
        reason = "its tensors are constrained (bake them first)"
    if reason is not None:
        raise ValueError(f"surgery: cannot resize {type(layer).__name__} in place: {reason}.")
    sizes, _ = _layer_kind(resized)
    for name in sizes:
        setattr(layer, name, getattr(resized, name))
    layer._parameters.update(resized._parameters)
    layer._buffers.update(resized._buffers)
    return layer


def not_resizable(layer: nn.Module) -> str | None:
    r"""Why slicing cannot resize ``layer`` in place (once its constraints are baked), or ``None``.

    Slicing changes a ``Conv2d``'s or ``Linear``'s weight and bias and a ``BatchNorm2d``'s
    affine parameters and statistics: a layer (a subclass) that also holds other tensors or
    modules would keep them at their old sizes, and a tensor under another library's
    parametrization (which :func:`~torchconstrain.bake` leaves) is computed, not stored.
    """
    sizes, tensors = _layer_kind(layer)
    if sizes is None:
        return f"expected a Conv2d, Linear or BatchNorm2d. Got {type(layer).__name__}"
    own = _own_forward(layer)
    if own is not None:
        return (f"its class overrides {own}: the surgery reads which channels are unused from the stored "
                "weights, not from what that code computes with them (a standardized weight mixes them)")
    chains = dict(layer.parametrizations.items()) if parametrize.is_parametrized(layer) else {}
    foreign = [name for name, chain in chains.items() if not all(isinstance(p, Constraint) for p in chain)]
    if foreign:
        return f"its {', '.join(foreign)} is under another library's parametrization (remove it first)"
    held = {name for name, tensor in [*layer._parameters.items(), *layer._buffers.items()] if tensor is not None}
    extra = sorted((held | set(chains)) - tensors) + sorted(set(layer._modules) - {"parametrizations"})
    if extra:
        return f"it also holds {', '.join(extra)}, which slicing would leave at the old sizes"
    return None


def _own_forward(layer: nn.Module) -> str | None:
    """The method of ``layer``'s class that computes its output other than its stock type's
    (``forward``, or a conv's ``_conv_forward``), or ``None``; a parametrized layer's class,
    made for its parametrizations, is judged by the class it was made from."""
    cls = type(layer).__mro__[1] if parametrize.is_parametrized(layer) else type(layer)
    stock = next((kind for kind, _, _ in _LAYERS if isinstance(layer, kind)), None)
    names = ("forward", "_conv_forward") if stock is nn.Conv2d else ("forward",)
    return next((name for name in names if stock is not None and getattr(cls, name) is not getattr(stock, name)), None)


def _layer_kind(layer: nn.Module) -> tuple[tuple[str, ...] | None, set[str]]:
    """The size attributes and tensor names of ``layer``'s type (``(None, set())``: not one slicing knows)."""
    return next(((sizes, tensors) for kind, sizes, tensors in _LAYERS if isinstance(layer, kind)), (None, set()))


def fold_batchnorm(model: nn.Module) -> int:
    r"""Fold every BatchNorm2d that directly follows a Conv2d in a Sequential into that conv.

    Modifies ``model`` in place: the conv gets the folded weight and a bias, the BatchNorm
    becomes ``nn.Identity`` (its ``state_dict`` keys go away); a new bias is trainable where
    the conv's weight is. In eval mode the outputs are unchanged to float32 rounding. For
    deployment: the folded model no longer trains like the original.

    Returns:
        The number of folded pairs.

    Raises:
        ValueError: a conv or BatchNorm of a pair has a class computing its output its own
            way (an overridden ``forward``), hooks, or another library's parametrization; a
            conv to fold still carries parametrizations (bake it first), is used
            elsewhere too (in a second conv/BN pair or any other place of the model: the
            folded weights would be wrong there), or its BatchNorm keeps no running
            statistics (it normalizes with each batch's, even in eval mode: no fixed affine
            map to fold); nothing is changed then.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchconstrain.surgery import fold_batchnorm
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> fold_batchnorm(model), type(model[1]).__name__
        (1, 'Identity')
    """
    pairs = [(seq, i) for seq in model.modules() if isinstance(seq, nn.Sequential)
             for i in range(len(seq) - 1)
             if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d)]
    names = {module: name for name, module in model.named_modules()}  # each module's first name
    _refuse_shared_convs(model, pairs, names)
    _refuse_unfoldable(pairs, names)
    for seq, i in pairs:
        if parametrize.is_parametrized(seq[i]):
            raise ValueError(f"surgery.fold_batchnorm: conv {names[seq[i]]} still has parametrizations; bake(model) first.")
        if seq[i + 1].running_mean is None:
            raise ValueError(
                f"surgery.fold_batchnorm: BatchNorm {names[seq[i + 1]]} has no running statistics "
                "(track_running_stats=False): it normalizes with each batch's, so it cannot be folded."
            )
    for seq, i in pairs:
        conv, bn = seq[i], seq[i + 1]
        weight, bias = nn.utils.fusion.fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        if conv.bias is None:  # a new bias: trainable where the weight is
            bias.requires_grad_(conv.weight.requires_grad)
        conv.weight, conv.bias = weight, bias
        seq[i + 1] = nn.Identity()
    return len(pairs)


def _refuse_unfoldable(pairs: list[tuple[nn.Sequential, int]], names: dict[nn.Module, str]) -> None:
    """Raise if a pair's outputs would not survive folding: a class computing its output
    its own way (a weight-standardized conv), a hook (the BatchNorm's goes with it, the
    conv's would see other outputs), or a parametrization other than torchconstrain's."""
    for seq, i in pairs:
        for layer in (seq[i], seq[i + 1]):
            own = _own_forward(layer)
            hooked = any(module_hooks(layer))
            foreign = parametrize.is_parametrized(layer) and not all(
                isinstance(p, Constraint) for chain in layer.parametrizations.values() for p in chain)
            reason = (f"its class {type(layer).__name__} overrides {own}" if own else
                      "it has hooks (the folded pair would not compute what they saw)" if hooked else
                      "a tensor of it is under another library's parametrization (remove it first)" if foreign else None)
            if reason:
                raise ValueError(f"surgery.fold_batchnorm: cannot fold {names[layer]}: {reason}. "
                                 "Nothing was folded.")


def _refuse_shared_convs(model: nn.Module, pairs: list[tuple[nn.Sequential, int]], names: dict[nn.Module, str]) -> None:
    """Raise if a conv to fold is also used elsewhere: in another slot of the model (a second
    conv/BN pair, or any other place), where the folded weights would be wrong."""
    slots = {}  # module -> the (parent, key) slots holding it
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is not None:
                slots.setdefault(child, []).append((parent, key))
    for seq, i in pairs:
        slot = (seq, list(seq._modules)[i])  # its key: a name in an OrderedDict Sequential
        others = [_slot_name(names, parent, key) for parent, key in slots[seq[i]] if (parent, key) != slot]
        if others:
            raise ValueError(
                f"surgery.fold_batchnorm: conv {_slot_name(names, *slot)} is also used as {', '.join(others)}: folding "
                "its BatchNorm into it would change that use too. Expected each conv to fold used once; give each use "
                "its own conv."
            )


def _slot_name(names: dict, parent: nn.Module, key: str) -> str:
    return f"{names[parent]}.{key}" if names[parent] else key

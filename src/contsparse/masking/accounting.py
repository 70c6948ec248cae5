"""Weights-remaining accounting, shared by every method so that all report sparsity alike."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from contsparse.masking.selection import DEFAULT_LAYER_TYPES


def weights_remaining(masks: Mapping[str, Tensor]) -> float:
    """Fraction (0..1) of prunable weights kept by ``masks`` (name -> bool/0-1 tensor)."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 1.0
    kept = sum(int(m.count_nonzero()) for m in masks.values())
    return kept / total


def per_layer_remaining(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """Name -> fraction of that tensor's weights kept."""
    return {name: int(m.count_nonzero()) / max(m.numel(), 1) for name, m in masks.items()}


def count_zeros(tensors: Mapping[str, object]) -> tuple[int, int]:
    """(zeros, total) over the tensors of ``tensors`` (a ``state_dict``: entries that are not
    tensors, such as a mask's ``_extra_state``, are skipped): used to check that a saved ticket
    has the zeros it claims."""
    values = [t for t in tensors.values() if isinstance(t, Tensor)]
    return sum(int((t == 0).sum()) for t in values), sum(t.numel() for t in values)


def weights_remaining_all_layers(model: nn.Module, masks: Mapping[str, Tensor]) -> float:
    """Fraction of every Linear and Conv weight of ``model`` that ``masks`` keeps, layers without a
    mask counted as kept: the sparsity papers quote when they prune every layer (STR, GMP, DNW),
    where :func:`weights_remaining` counts only the masked ones (a ResNet-50 with its downsample
    convs and classifier unmasked keeps 19 % of its weights whatever the masks do)."""
    weights = {f"{module_name}.weight" if module_name else "weight": module._parameters.get("weight")
               for module_name, module in model.named_modules(remove_duplicate=False)
               if isinstance(module, DEFAULT_LAYER_TYPES)}
    seen = {id(weight) for name, weight in weights.items() if name in masks}  # a masked weight tied elsewhere too
    total = kept = 0
    for weight in weights.values():
        if weight is not None and id(weight) not in seen:  # None: a parametrized (masked) weight
            seen.add(id(weight))
            total += weight.numel()
            kept += weight.numel()
    for mask in masks.values():
        total += mask.numel()
        kept += int(mask.count_nonzero())
    return kept / total if total else 1.0

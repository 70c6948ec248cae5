"""Attach CS masks to any ``nn.Module`` and operate on all of them at once."""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from contsparse.errors import some_of
from contsparse.masking.accounting import per_layer_remaining, weights_remaining
from contsparse.masking.parametrization import ContinuousMask, MaskMode, set_temperature
from contsparse.masking.selection import LayerSelection, owner_of

# Once hardened, a layer's mask lives beside the weight as a submodule named "<attr>_cs_mask".
HARD_SUFFIX = "_cs_mask"


class MaskSet:
    """Handle on the masks attached to one model.

    The model itself is modified in place (each selected ``weight`` becomes parametrized), so its
    ``forward``, ``state_dict`` and ``.to(device)`` work as before; this object only groups the
    operations a sparsification method needs: temperature, penalty, reset, hardening, accounting.
    """

    def __init__(self, model: nn.Module, masks: dict[str, ContinuousMask],
                 tied: dict[str, list[str]] | None = None) -> None:
        self.model = model
        self.masks = masks  # "<module qualname>.<parameter>" (e.g. "fc.weight") -> its mask
        # name -> the other "<module>.<attr>" names of the same Parameter (tied weights), which
        # carry the same mask: one weight tensor, one mask, wherever the model uses it
        self.tied = {name: list((tied or {}).get(name, ())) for name in masks}
        self._owners: dict[str, tuple[nn.Module, str]] | None = None
        self._permanent = False  # make_permanent() took the masks off: nothing is left to act on
        self._step_hooks: list[torch.utils.hooks.RemovableHandle] = []  # keep_pruned_at_zero's

    def _require_masks(self, action: str) -> None:
        """Refuse to act once the masks were made permanent (an empty set would report a dense
        model, and stop re-zeroing pruned weights, without a word)."""
        if self._permanent:
            raise RuntimeError(f"cannot {action}: the masks were made permanent and the model is a plain nn.Module "
                               "now (its pruned weights are zeros: count them with "
                               "contsparse.masking.count_zeros(model.state_dict()))")

    # -- parameters ----------------------------------------------------------------------------
    def mask_parameters(self) -> list[nn.Parameter]:
        """The mask logits: give them their own optimiser, without weight decay."""
        return [m.logits for m in self.masks.values()]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every model parameter that is not a mask logit (weights, biases, norm parameters)."""
        logit_ids = {id(p) for p in self.mask_parameters()}
        return [p for p in self.model.parameters() if id(p) not in logit_ids]

    def masked_weights(self) -> dict[str, nn.Parameter]:
        """Name -> the raw (unmasked) weight parameter behind each mask. Looked up at each call
        (the layers are found once): ``load_state_dict(assign=True)`` puts new ones in place."""
        if self._owners is None:
            self._owners = {name: owner_of(self.model, name) for name in self.masks}
        return {name: (module._parameters[attr] if mask.mode == "hard" else module.parametrizations[attr].original)
                for (name, mask), (module, attr) in zip(self.masks.items(), self._owners.values(), strict=True)}

    # -- temperature, mode ---------------------------------------------------------------------
    @property
    def temperature(self) -> float:
        return next(iter(self.masks.values())).temperature if self.masks else 1.0

    @temperature.setter
    def temperature(self, beta: float) -> None:
        self._require_masks("set the temperature")
        set_temperature(self.masks.values(), beta)

    @property
    def mode(self) -> MaskMode:
        return next(iter(self.masks.values())).mode if self.masks else "hard"

    def harden(self, warn_empty: bool = True) -> None:
        """Use the binary mask ``H(s) = 1[s > 0]`` from now on (ticket training, fine-tuning).

        Folds mask and scale into the weights and takes the parametrization off: each layer is a
        plain layer again (same ``Parameter`` objects, so existing optimisers keep working) and
        trains at dense speed; the mask stays beside it as ``<layer>.weight_cs_mask`` so the
        ``state_dict`` still carries it. Afterwards call :meth:`zero_pruned` after each optimiser
        step, or let :meth:`keep_pruned_at_zero` do so. Load a hardened ``state_dict`` into a
        model only after calling ``harden()`` on it. Warns when a layer keeps no weight (a
        network cut in two; often logits that no optimiser stepped) unless ``warn_empty=False``
        (a caller that reports empty layers its own way).
        """
        self._harden(apply_scale=True, stacklevel=3, warn_empty=warn_empty)

    def _harden(self, apply_scale: bool, stacklevel: int, warn_empty: bool = True) -> None:
        """:meth:`harden`; ``apply_scale=False`` folds ``H(s)`` without the masks' scale."""
        self._require_masks("harden them")
        weights = self.masked_weights()
        for name, mask in self.masks.items():  # checked before any layer changes
            for module, attr in self.places(name) if mask.mode == "soft" else ():
                others = [type(p).__name__ for p in module.parametrizations[attr] if p is not mask]
                if others:
                    raise ValueError(f"{name} has a parametrization registered after its CS mask "
                                     f"({', '.join(others)}), which hardening would drop: remove it first")
        softened = [name for name, mask in self.masks.items() if mask.mode == "soft"]
        # values to look at (not a model on the meta device, built to load a hardened state_dict into)
        warn_empty = warn_empty and not any(mask.logits.is_meta for mask in self.masks.values())
        at_init = warn_empty and softened and all(bool((mask.logits == mask.mask_init).all())
                                                  for mask in self.masks.values())
        got_gradients = any(mask.logits.grad is not None for mask in self.masks.values())
        for name in softened:
            self.masks[name].harden(weights[name], apply_scale=apply_scale)
            for module, attr in self.places(name):
                # (the weight joins the module's parameters last: checkpoints' optimiser states
                # follow that order; make_permanent puts it back in its place)
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                module.register_module(attr + HARD_SUFFIX, self.masks[name])
        empty = [name for name in softened if not self.masks[name].hard_mask.any()] if warn_empty else []
        # Logits still at s0 with no gradient: masks just attached, hardened to load a hardened
        # state_dict into them (the documented way): their values are about to be replaced.
        if empty and not (at_init and not got_gradients):
            hint = (": the logits got gradients but are still at s0 (were masks.mask_parameters() given to an "
                    "optimiser, made after attach_masks, and stepped?)" if at_init else "")
            which = empty[0] if len(empty) == 1 else f"{len(empty)} of {len(self.masks)} layers ({some_of(empty, 3)})"
            warnings.warn(f"harden(): {which} {'keeps' if len(empty) == 1 else 'keep'} no weight at all "
                          f"(every logit <= 0){hint}", stacklevel=stacklevel)

    def folded_scales(self) -> dict[nn.Parameter, float]:
        """Hardened weight -> the scale ``c = 1 / sigmoid(s0)`` folded into it (masks with a scale).

        The fold leaves the network as it was but not its training: the optimiser now steps on
        ``c * W``, whose gradient is ``1 / c`` of ``W``'s, so SGD moves the kept weights ``c**2``
        times less than the reference code (which keeps ``W`` and multiplies by ``c`` in every
        forward) and Adam ``c`` times less. To take the reference's steps, give these weights a
        group of their own with ``lr * c**2`` and ``weight_decay / c**2`` (SGD), or ``lr * c``,
        ``eps / c`` and ``weight_decay / c**2`` (Adam); the CLI does so.
        """
        self._require_masks("report the folded scales")
        weights = self.masked_weights()
        return {weights[name]: mask.scale for name, mask in self.masks.items()
                if mask.mode == "hard" and mask.scale != 1.0}

    def zero_pruned(self) -> None:
        """Re-zero pruned weights (hard mode): one fused in-place multiply over all layers. The
        lists are made again at each call: ``.to()`` or ``.double()`` replaces the mask buffers."""
        self._require_masks("re-zero pruned weights")
        weights = self.masked_weights()
        pairs = [(weights[name], mask.hard_mask) for name, mask in self.masks.items() if mask.mode == "hard"]
        if pairs:
            with torch.no_grad():
                torch._foreach_mul_([w for w, _ in pairs], [m for _, m in pairs])

    def keep_pruned_at_zero(self, optimizer: torch.optim.Optimizer):
        """Run :meth:`zero_pruned` after every ``optimizer.step()``; returns the hook handle.
        :meth:`make_permanent` removes the hook (the zeros are then the model's own weights)."""
        handle = optimizer.register_step_post_hook(lambda *_: self.zero_pruned())
        self._step_hooks.append(handle)
        return handle

    def reset_logits(self) -> None:
        """Between search rounds: ``s <- min(beta * s, s0)``; then the temperature restarts at 1."""
        self._require_masks("reset the logits")
        for mask in self.masks.values():
            mask.reset_logits()
        self.temperature = 1.0

    # -- rewinding (lottery tickets) -------------------------------------------------------------
    def rewind_point(self) -> dict[str, Tensor]:
        """A copy of what a lottery ticket rewinds to: every weight, bias and buffer of the model's
        ``state_dict`` (norm statistics; not non-persistent buffers), not the masks. Masked weights
        are stored unmasked, under their plain names (``fc.weight``), so a point taken in soft mode
        loads after :meth:`harden`."""
        self._require_masks("store a rewind point")
        weights = self.masked_weights()
        point = {name: (weights[name] / mask.scale if mask.mode == "hard" else weights[name]).detach().clone()
                 for name, mask in self.masks.items()}
        for key, value in self._unmasked_state().items():
            point[key] = value.detach().clone()
        return point

    def rewind(self, point: Mapping[str, Tensor]) -> None:
        """Load a :meth:`rewind_point` (same or other mode): in hard mode the masked weights become
        ``scale * H(s) * W_k``, the ticket's start; the masks themselves are kept."""
        self._require_masks("rewind")
        _require_mapping(point)
        weights, (state, aliases) = self.masked_weights(), self._state_by_kind()
        targets: dict[str, Tensor] = {**weights, **state}
        missing, unknown = sorted(set(targets) - set(point)), sorted(set(point) - set(targets) - aliases)
        if missing or unknown:
            raise KeyError("the rewind point does not fit this model: " + "; ".join(
                f"{what} {some_of(keys)}" for what, keys in (("no value for", missing), ("no tensor named", unknown))
                if keys))
        wrong = [f"{key} {tuple(point[key].shape)} != {tuple(target.shape)}" for key, target in targets.items()
                 if not isinstance(point[key], Tensor) or point[key].shape != target.shape]
        if wrong:
            raise ValueError(f"rewind point shapes do not fit this model: {'; '.join(wrong[:5])}")
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(point[key])
            for name, mask in self.masks.items():
                if mask.mode == "hard":  # as harden() folds them
                    weights[name].mul_(mask.hard_mask).mul_(mask.scale)

    def _unmasked_state(self) -> dict[str, Tensor]:
        """The model's ``state_dict`` tensors other than the masks' and the masked weights'."""
        return self._state_by_kind()[0]

    def _state_by_kind(self) -> tuple[dict[str, Tensor], set[str]]:
        """The model's ``state_dict`` tensors other than the masked weights and every mask's (another
        MaskSet's on the same model too), and the keys of those, told apart by identity: a module
        reached under several names (a siamese branch, one layer used three times) lists a masked
        weight under each of them, and rewind points of older versions stored them."""
        masked = {id(t) for module in self.model.modules() if isinstance(module, ContinuousMask)
                  for t in (*module.parameters(), *module.buffers())}
        masked |= {id(weight) for weight in self.masked_weights().values()}
        tensors = {key: value for key, value in self.model.state_dict(keep_vars=True).items()
                   if isinstance(value, Tensor)}
        return ({key: value for key, value in tensors.items() if id(value) not in masked},
                {key for key, value in tensors.items() if id(value) in masked})

    # -- the penalty ---------------------------------------------------------------------------
    def num_prunable(self) -> int:
        return sum(m.logits.numel() for m in self.masks.values())

    def penalty(self, normalize: bool = False) -> Tensor:
        """``sum over masks of sum(sigmoid(beta * s))``, the smooth L0 stand-in.

        With ``normalize`` it is divided by the number of prunable weights (a mean in 0..1), so the
        same ``lambda`` means the same pressure on a model of any size.
        """
        self._require_masks("compute the penalty")
        total = sum(mask.soft_mask_sum() for mask in self.masks.values())
        if not isinstance(total, Tensor):
            return torch.zeros(())
        return total / self.num_prunable() if normalize else total

    def fuse_penalty(self, coef: float, normalize: bool = False) -> None:
        """Add the gradient of ``coef * penalty(normalize)`` inside each mask's backward pass.

        Same gradient as adding the penalty to the loss, three fewer passes over every weight
        tensor per step; the training loop uses it and evaluates :meth:`penalty` only to log it.
        ``coef = 0`` turns it off. The gradient is added as it is: nothing that multiplies the loss
        reaches it (a ``GradScaler``'s scale, ``1 / k`` for ``k`` accumulated micro-batches), so
        scale ``coef`` alike or add :meth:`penalty` to the loss there.
        """
        self._require_masks("fuse the penalty")
        if isinstance(coef, bool) or not isinstance(coef, numbers.Real) or not math.isfinite(coef) or coef < 0:
            raise ValueError(f"the penalty coefficient must be a finite number >= 0, got {coef!r}")
        per_weight = coef / self.num_prunable() if normalize else coef
        for mask in self.masks.values():
            mask.fused_penalty = float(per_weight)

    # -- accounting ----------------------------------------------------------------------------
    def binary_masks(self) -> dict[str, Tensor]:
        """Name -> bool tensor ``s > 0``: the mask a ticket would use."""
        self._require_masks("report the masks")
        return {name: mask.binary_mask() for name, mask in self.masks.items()}

    def weights_remaining(self) -> float:
        """Fraction of prunable weights with ``s > 0``."""
        return weights_remaining(self.binary_masks())

    def per_layer_remaining(self) -> dict[str, float]:
        return per_layer_remaining(self.binary_masks())

    def load_binary_masks(self, masks: dict[str, Tensor], scale: bool = True) -> None:
        """Install saved binary masks and harden: the model computes with them from now on.

        ``scale=True`` multiplies the kept weights by the masks' ``1 / sigmoid(s0)``, as a CS ticket
        does (the weights are rewound ones, e.g. a lottery ticket's start); ``scale=False`` keeps
        them as they are: weights that were trained under the masks and carry the scale already,
        e.g. a ``state_dict`` saved after :meth:`make_permanent`.
        """
        self._require_masks("load masks")
        _require_mapping(masks)
        missing, unknown = set(self.masks) - set(masks), set(masks) - set(self.masks)
        if missing or unknown:
            raise KeyError(f"the saved masks do not fit this model: none for {sorted(missing)}"
                           if missing else f"the saved masks do not fit this model: no layer {sorted(unknown)}")
        if self.mode == "hard":
            raise ValueError("masks are already hardened; load binary masks into a soft MaskSet")
        for name in self.masks:  # checked before any mask changes: a failed load leaves the model as it was
            check_binary_mask(name, masks[name])
        wrong = [f"{name} {tuple(masks[name].shape)} != {tuple(mask.logits.shape)}"
                 for name, mask in self.masks.items() if masks[name].shape != mask.logits.shape]
        if wrong:
            raise ValueError(f"saved mask shapes do not fit this model: {'; '.join(wrong)}")
        if not isinstance(scale, bool):
            raise TypeError(f"scale must be True or False, got {scale!r}")
        for name, mask in self.masks.items():
            mask.set_binary_mask(masks[name])
        self._harden(apply_scale=scale, stacklevel=3)

    def set_hard_masks(self, keep: dict[str, Tensor]) -> None:
        """Replace the hard masks (methods that prune by magnitude, at random, on a schedule) and
        zero the weights they prune. Layers not named keep their mask."""
        self._require_masks("set hard masks")
        _require_mapping(keep)
        if self.mode != "hard":
            raise ValueError("harden the masks before setting hard masks")
        for name, mask in keep.items():  # checked before any mask changes
            if name not in self.masks:
                raise ValueError(f"no masked weight named {name!r}; the masks are on {', '.join(self.masks)}")
            check_binary_mask(name, mask)
            if mask.shape != self.masks[name].hard_mask.shape:
                raise ValueError(f"hard mask for {name}: shape {tuple(mask.shape)} != weight shape "
                                 f"{tuple(self.masks[name].hard_mask.shape)}")
        weights = self.masked_weights()
        with torch.no_grad():
            for name, mask in keep.items():
                self.masks[name].hard_mask.copy_(mask)
                weights[name].mul_(self.masks[name].hard_mask)

    # -- leaving ------------------------------------------------------------------------------
    def make_permanent(self) -> nn.Module:
        """Bake ``W * scale * H(s)`` into plain weights and remove the masks: the model becomes an
        ordinary ``nn.Module`` (zeros included) that loads without contsparse installed. The
        ``MaskSet`` has nothing left to act on and refuses further calls; the hooks of
        :meth:`keep_pruned_at_zero` are removed, so training on regrows the pruned weights."""
        if self._permanent:
            return self.model
        self.harden()
        self.zero_pruned()  # pruned weights that training moved without keep_pruned_at_zero
        moves = []
        for name, mask in self.masks.items():
            for holder, (module, attr) in zip(self.holders(name), self.places(name), strict=True):
                delattr(module, attr + HARD_SUFFIX)
                moves.append((mask.positions.get(holder), module, attr))
        for position, module, attr in sorted(moves, key=lambda move: -1 if move[0] is None else move[0]):
            _move_parameter(module, attr, position)  # in ascending order: an LSTM's weight_ih_l0, then weight_hh_l0
        for handle in self._step_hooks:  # an optimiser that fine-tunes on would be refused at each step
            handle.remove()
        self.masks, self.tied, self._owners, self._permanent, self._step_hooks = {}, {}, None, True, []
        return self.model

    def holders(self, name: str) -> list[str]:
        """``name`` and the names of the weights tied to it: every place the model reads it."""
        return [name, *self.tied.get(name, ())]

    def places(self, name: str) -> list[tuple[nn.Module, str]]:
        """:meth:`holders` as (module, attribute) pairs."""
        return [owner_of(self.model, holder) for holder in self.holders(name)]

    def __iter__(self) -> Iterator[tuple[str, ContinuousMask]]:
        return iter(self.masks.items())

    def __len__(self) -> int:
        return len(self.masks)

    def __repr__(self) -> str:
        if self._permanent:
            return "MaskSet(made permanent: no masks left)"
        if not self.masks:
            return "MaskSet(no masks)"
        remaining = "" if any(mask.logits.is_meta for mask in self.masks.values()) \
            else f", remaining={self.weights_remaining():.4f}"
        return (f"MaskSet({len(self)} tensors, {self.num_prunable():,} weights, mode={self.mode}, "
                f"temperature={self.temperature:.4g}{remaining})")


def attach_masks(model: nn.Module, mask_init: float = 0.0, *, scale_by_init: bool = True,
                 selection: LayerSelection | None = None) -> MaskSet:
    """Give every selected weight CS mask logits initialised to ``mask_init``.

    By default all Linear and Conv weights are masked; pass a :class:`LayerSelection` to choose
    layers, or other parameters (LSTM and attention weights, ...).
    Returns a :class:`MaskSet`; the model is changed in place and keeps its own ``forward``.
    A tied weight (one ``Parameter`` held by several modules, e.g. a language model's output layer
    and its embedding) gets one mask, attached wherever the model holds it, so every use of the
    weight sees the same masked tensor and the ticket prunes it everywhere.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_masks takes an nn.Module, got {type(model).__name__}")
    if isinstance(mask_init, bool) or not isinstance(mask_init, numbers.Real):
        raise TypeError(f"mask_init must be a number, got {type(mask_init).__name__}"
                        + (" (pass the selection as selection=...)" if isinstance(mask_init, LayerSelection) else ""))
    if not isinstance(scale_by_init, bool):
        raise TypeError(f"scale_by_init must be True or False, got {scale_by_init!r}")
    selection = LayerSelection() if selection is None else selection
    if not isinstance(selection, LayerSelection):
        raise TypeError(f"selection must be a LayerSelection, got {type(selection).__name__}")
    names = selection.select_tensors(model)
    if not names:
        raise ValueError(f"no layer of the model matches the mask selection: {selection.describe_miss(model)}")
    holders = _parameter_holders(model)
    # tensors of the chosen types that include / exclude / exclude_first / exclude_last left out
    # (only a tie can bring one back, so only models with tied weights need them)
    excluded = set(dataclasses.replace(selection, include=(), exclude=(), exclude_first=False,
                                       exclude_last=False).select_tensors(model)) - set(names) \
        if any(len(places) > 1 for places in holders.values()) else set()
    masks: dict[str, ContinuousMask] = {}
    tied: dict[str, list[str]] = {}
    covered: set[str] = set()  # tensors already masked as a tied copy of an earlier selected one
    for name in names:  # every layer checked and its mask made before any layer changes
        if name in covered:
            continue
        module, attr = owner_of(model, name)
        _check_maskable(module, attr, name)
        weight = getattr(module, attr)
        places = holders[id(weight)]
        for place in places:
            _check_maskable(*owner_of(model, place), place)
        mask = ContinuousMask(weight.shape, mask_init, scale_by_init, device=weight.device, dtype=weight.dtype)
        if weight.dim() == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
            # Logits in the weight's layout: a channels-last weight times a contiguous mask would
            # take the slow strided elementwise path and hand the conv a weight to re-layout.
            mask.to(memory_format=torch.channels_last)
        others = [place for place in places if place != name]
        mask.uses, mask.attached_as = 1 + len(others), name
        masks[name], tied[name] = mask, others
        covered.update(others)
    for name, mask in masks.items():  # where make_permanent puts each back: before any is taken out
        for place in [name, *tied[name]]:
            module, attr = owner_of(model, place)
            mask.positions[place] = list(module._parameters).index(attr)
    for name, mask in masks.items():
        left_out = [place for place in tied[name] if place in excluded]
        if left_out:  # one tensor, one mask: the tie wins over an exclusion, which the user should know
            warnings.warn(f"{', '.join(left_out)} {'is' if len(left_out) == 1 else 'are'} tied to {name}, so "
                          f"{'it gets' if len(left_out) == 1 else 'they get'} its mask although the selection "
                          "leaves it out; untie the weights or exclude both to keep it dense", stacklevel=2)
        for place in [name, *tied[name]]:
            parametrize.register_parametrization(*owner_of(model, place), mask, unsafe=True)
    return MaskSet(model, masks, tied)


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The ``state_dict`` of a hardened (or unmasked) model as the plain architecture holds it
    (keys and values; a hardened layer lists its weight last), without changing the model: the
    masks are folded into the weights already, so only their own entries (logits, hard mask,
    settings) are left out. For tools that expect tensors only (an EMA copy, a checkpoint for a
    model built without contsparse); :meth:`MaskSet.make_permanent` does the same to the model."""
    if any(isinstance(module, ContinuousMask) and module.mode != "hard" for module in model.modules()):
        raise ValueError("harden the masks first: a soft mask is not folded into its weight")
    return {key: value for key, value in model.state_dict().items()
            if isinstance(value, Tensor) and f"{HARD_SUFFIX}." not in key}


def _move_parameter(module: nn.Module, attr: str, position: int | None) -> None:
    """Put ``attr`` back at ``position`` among the module's parameters, where it was before its
    mask was attached: taking a parametrization off appends it (``bias`` before ``weight``), and
    an optimiser's ``state_dict`` or a ``zip`` of two models' parameters goes by that order."""
    params = module._parameters
    if position is None or attr not in params:
        return
    names = [name for name in params if name != attr]
    names.insert(min(position, len(names)), attr)
    for name in names:
        params[name] = params.pop(name)


def _require_mapping(masks: object) -> None:
    if not isinstance(masks, Mapping):
        raise TypeError(f"the masks must be a dict of weight name -> tensor, got {type(masks).__name__}")


def check_binary_mask(name: str, mask: object) -> None:
    """A binary mask is a bool tensor or one holding only 0 and 1: logits or keep probabilities
    passed by mistake would otherwise keep every nonzero entry, a silently dense model."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"the mask for {name} must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"the mask for {name} must be boolean or hold only 0 and 1 (logits or probabilities? "
                         "threshold them first, e.g. logits > 0)")


def _check_maskable(module: nn.Module, attr: str, name: str) -> None:
    """A clear error for a tensor that a mask cannot be attached to (instead of a silently
    unmasked layer or an error deep in the first backward pass)."""
    if parametrize.is_parametrized(module, attr):
        kinds = {type(p).__name__ for p in module.parametrizations[attr]}
        if kinds == {ContinuousMask.__name__}:
            raise ValueError(f"{name} already has a CS mask (masks attached twice?)")
        raise ValueError(f"{name} already has a parametrization ({', '.join(sorted(kinds))}): a CS mask must be "
                         "its only one; remove it (parametrize.remove_parametrizations) or exclude the layer")
    if isinstance(getattr(module, attr + HARD_SUFFIX, None), ContinuousMask):
        raise ValueError(f"{name} carries a hardened CS mask: call make_permanent() before attaching new masks")
    if isinstance(module._parameters.get(attr), nn.parameter.UninitializedParameter):
        raise ValueError(f"{name} belongs to a lazy module ({type(module).__name__}) whose shape is not known yet: "
                         "run one batch through the model before attaching masks, or exclude the layer")
    if not isinstance(module._parameters.get(attr), nn.Parameter):
        raise ValueError(f"{name} is not a parameter but a tensor computed by a hook (torch.nn.utils.prune or the "
                         "old weight_norm?): make it a parameter again (prune.remove / remove_weight_norm) or "
                         "exclude the layer")
    if isinstance(module, nn.Embedding | nn.EmbeddingBag) and (module.sparse or module.max_norm is not None):
        raise ValueError(f"{name}: an embedding with sparse=True or max_norm cannot be masked (sparse gradients / "
                         "in-place renormalisation of the weight); turn those off or exclude the layer")


def _parameter_holders(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every ``"<module>.<attr>"`` that holds it (a module reached under two names once)."""
    holders: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append(f"{module_name}.{attr}" if module_name else attr)
    return holders


def find_masks(model: nn.Module) -> MaskSet:
    """The :class:`MaskSet` of a model that already carries CS masks (e.g. after loading).

    A mask found in several places (a tied weight) is listed once, under the name it had when it
    was attached (the first place found, for a mask unpickled from before that name was kept).
    A model without masks is refused: an empty set would report it dense and act on nothing.
    """
    found: list[tuple[str, ContinuousMask]] = []  # every place a mask is attached, in the model's order
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if parametrize.is_parametrized(module):
            found += [(prefix + attr, p) for attr, plist in module.parametrizations.items()
                      for p in plist if isinstance(p, ContinuousMask)]
        found += [(prefix + child_name[: -len(HARD_SUFFIX)], child) for child_name, child in module.named_children()
                  if isinstance(child, ContinuousMask) and child_name.endswith(HARD_SUFFIX)]
    places: dict[int, list[str]] = {}
    for name, mask in found:
        places.setdefault(id(mask), []).append(name)
    if not found:
        raise ValueError(f"{type(model).__name__} carries no CS masks: attach them with attach_masks(model)")
    masks, tied = {}, {}
    for name, mask in found:
        names = places[id(mask)]
        if name == (mask.attached_as if mask.attached_as in names else names[0]):
            masks[name], tied[name] = mask, [other for other in names if other != name]
    return MaskSet(model, masks, tied)

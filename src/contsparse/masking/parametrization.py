"""The CS mask as a ``torch.nn.utils.parametrize`` parametrization.

Attaching the mask as a parametrization keeps the user's ``forward`` untouched: ``module.weight``
simply *is* the masked weight, so any model and any training loop keep working.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes

from contsparse.masking import kernels

MaskMode = Literal["soft", "hard"]
# Below this s0 the scale 1 / sigmoid(s0) exceeds 1e13: float32 weights lose their meaning
MIN_SCALED_MASK_INIT = -30.0


class _SoftMaskedWeight(torch.autograd.Function):
    """``W * scale * sigmoid(beta * s)`` with a hand-written backward.

    On CPU an elementwise pass over a weight-sized tensor costs about as much as a small matmul,
    so passes are counted: on contiguous float32 CPU tensors one loop each way (``kernels``, compiled
    on first use), elsewhere three ops in the forward and three in the backward (a fused penalty
    included), where autograd would take about ten. ``addcmul`` on a scalar computes a constant
    plus a product times a constant in one pass.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, logits: Tensor, beta: float, scale: float,  # type: ignore[override]
                owner: ContinuousMask, penalty_coef: float) -> Tensor:
        fused = _fused_kernels(weight, logits)
        if fused is not None:  # (the C++ node, not this one, takes the fused penalty's usual case)
            out, mask = fused.forward(weight, logits, beta, scale, True)
        else:
            mask = torch.mul(logits, beta).sigmoid_()
            out = torch.addcmul(_zero(weight), weight, mask, value=scale)
        owner._remember_mask(mask, logits)
        if _graph_task_id() == -1:  # not a recomputation inside a backward pass (activation checkpointing)
            _set_flag(owner._penalty_due, True)
        ctx.save_for_backward(mask, weight, logits)  # the logits for a differentiable backward
        ctx.beta, ctx.scale, ctx.penalty_coef, ctx.owner = beta, scale, penalty_coef, owner
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # An optimiser step may follow, and fused optimisers change the logits without bumping
        # their version: the forward's mask must not be reused for the penalty after this point.
        owner = ctx.owner
        owner.__dict__["_cached_mask"] = None
        penalty_coef = ctx.penalty_coef if _take_flag(owner._penalty_due) else 0.0
        mask, weight, logits = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True (second-order terms): the formula, differentiably
            return (*_differentiable_gradients(grad, weight, logits, ctx.beta, ctx.scale, penalty_coef),
                    None, None, None, None)
        batched = _functorch_active() or _legacy_batched(grad)
        if all(ctx.needs_input_grad[:2]) and not batched:
            fused = _fused_kernels(grad, weight, mask)  # the mask too: a saved-tensor hook may have moved it
            if fused is not None:
                return (*fused.backward(grad, weight, mask, True, ctx.beta, ctx.scale, penalty_coef),
                        None, None, None, None)
        grad_weight = torch.addcmul(_zero(grad), grad, mask, value=ctx.scale) if ctx.needs_input_grad[0] else None
        grad_logits = None
        if ctx.needs_input_grad[1]:
            # d/ds of g * W * scale * m + lambda * m = (g * W * scale + lambda) * beta * m * (1 - m):
            # one addcmul on the scalar beta * lambda, then sigmoid_backward (u * m * (1 - m)) in
            # place: writing into the temporary just read spares a fresh weight-sized buffer's
            # memory traffic (about 3 % of a LeNet-300-100 search step). torch.vmap (batched
            # gradients, vectorized jacobians) has no rule for the out= form: there, a new tensor.
            if grad.dtype == torch.float16:  # beta * scale * g * W can pass 65504 before m * (1 - m) shrinks it
                grad, weight, mask = grad.float(), weight.float(), mask.float()
            base = _zero(grad) if not penalty_coef else grad.new_full((), ctx.beta * penalty_coef)
            scaled = torch.addcmul(base, grad, weight, value=ctx.beta * ctx.scale)
            if batched:  # torch.func (vmap) or is_grads_batched: the legacy vmap
                grad_logits = torch.ops.aten.sigmoid_backward(scaled, mask)
            else:
                grad_logits = torch.ops.aten.sigmoid_backward.grad_input(scaled, mask, grad_input=scaled)
        return grad_weight, grad_logits, None, None, None, None


def _differentiable_gradients(grad: Tensor, weight: Tensor, logits: Tensor, beta: float | Tensor, scale: float,
                              penalty_coef: float) -> tuple[Tensor, Tensor]:
    """Gradients of ``W * scale * sigmoid(beta * s)`` (plus ``penalty_coef * sum(sigmoid(beta * s))``)
    for ``W`` and ``s`` in plain operations: autograd can differentiate them again."""
    mask = torch.sigmoid(logits * beta)
    grad_weight = grad * mask * scale
    grad_logits = (grad * weight * scale + penalty_coef) * beta * mask * (1 - mask)
    return grad_weight, grad_logits


class _TraceableSoftMaskedWeight(torch.autograd.Function):
    """The same product and gradients (fused penalty included) in a form ``torch.compile`` traces:
    no side effects, no in-place ops on intermediates, and the temperature as a tensor, since a
    float would be baked into the graph and recompile it at every new temperature. Inductor fuses
    the passes itself."""

    @staticmethod
    def forward(ctx, weight: Tensor, logits: Tensor, beta: Tensor, scale: float,  # type: ignore[override]
                penalty_coef: float) -> Tensor:
        ctx.save_for_backward(weight, logits, beta)
        ctx.scale, ctx.penalty_coef = scale, penalty_coef
        return weight * torch.sigmoid(logits * beta) * scale

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, logits, beta = ctx.saved_tensors
        return (*_differentiable_gradients(grad, weight, logits, beta, ctx.scale, ctx.penalty_coef),
                None, None, None)


class _SoftMaskSum(torch.autograd.Function):
    """``sum(sigmoid(beta * s))`` reusing the mask computed in this step's forward pass."""

    @staticmethod
    def forward(ctx, logits: Tensor, mask: Tensor, beta: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask, logits)
        ctx.beta = beta
        return _accurate_sum(mask)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        mask, logits = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True (second-order terms): the formula, differentiably
            mask = torch.sigmoid(logits * ctx.beta)
            return grad * ctx.beta * mask * (1 - mask), None, None
        # beta * m * (1 - m)
        return torch.addcmul(mask, mask, mask, value=-1.0).mul_(grad * ctx.beta), None, None


def _fused_kernels(*tensors: Tensor):
    """The compiled kernels when they can compute this call (plain contiguous float32 CPU tensors,
    no dispatch mode such as FakeTensorMode), else ``None``: the eager operations."""
    if _dispatch_modes() or not kernels.applicable(*tensors):
        return None
    return kernels.load()


def _new_flag(value: bool = False) -> Tensor:
    """The penalty's flag: a plain CPU tensor whatever the default device (a model built under
    ``with torch.device("meta")``), dispatch mode or inference mode in force."""
    with _disable_current_modes(), torch.inference_mode(False):
        return torch.tensor(value, dtype=torch.bool, device="cpu")


def _set_flag(flag: Tensor, value: bool) -> None:
    """Set the penalty's flag, also under a dispatch mode (FakeTensorMode refuses real tensors) and
    when it is an inference tensor (a model deep-copied under ``inference_mode``)."""
    if _dispatch_modes() or flag.is_inference():
        with _disable_current_modes(), torch.inference_mode():
            flag.fill_(value)
    else:
        flag.fill_(value)


def _take_flag(flag: Tensor) -> bool:
    """Whether the flag was set; clears it."""
    if _dispatch_modes():
        with _disable_current_modes():
            return _take_flag(flag)
    if not flag.item():
        return False
    _set_flag(flag, False)
    return True


_ZEROS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _zero(like: Tensor) -> Tensor:
    """A shared read-only zero scalar for ``addcmul``'s base (made once: this runs per layer and step).
    Under a dispatch mode (``FakeTensorMode``, ...) the mode's own tensor, made each time: a cached
    fake tensor would make every later call fake, a cached real one is refused by such a mode."""
    if _dispatch_modes():
        return like.new_zeros(())
    key = (like.dtype, like.device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        if type(zero) is Tensor:
            _ZEROS[key] = zero
    return zero


class ContinuousMask(nn.Module):
    """Mask logits ``s`` for one weight tensor; computes the effective weight.

    * soft mode (search): ``W * scale * sigmoid(beta * s)``, differentiable in ``W`` and ``s``.
    * hard mode (ticket training, fine-tuning): ``H(s) = 1[s > 0]`` and ``scale`` are folded into
      the weight once, at :meth:`harden` (``W <- scale * W * H``), and :class:`MaskSet` takes the
      parametrization off, so a ticket trains at dense speed. Pruned entries are kept exactly
      zero by :meth:`zero_pruned`, which the training loop runs after every optimiser step.

    ``scale`` is ``1 / sigmoid(s0)`` when ``scale_by_init`` (the reference code's choice): at
    ``beta = 1, s = s0`` the effective weight is then exactly ``W``, and a ticket's surviving
    weights are ``scale`` times the rewound ones. (The reference multiplies by ``scale`` in every
    forward instead of folding it; the network is the same, the optimiser sees ``scale * W``.)
    """

    def __init__(self, shape: torch.Size, mask_init: float = 0.0, scale_by_init: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not math.isfinite(mask_init):
            raise ValueError(f"mask_init must be finite, got {mask_init}")
        if scale_by_init and mask_init < MIN_SCALED_MASK_INIT:
            raise ValueError(f"mask_init = {mask_init:g} with scale_by_init multiplies the weights by 1 / sigmoid(s0)"
                             f" > 1e13: use mask_init >= {MIN_SCALED_MASK_INIT:g} or scale_by_init=False")
        self.mask_init = float(mask_init)
        self.scale_by_init = scale_by_init
        self.scale = 1.0 / _sigmoid(self.mask_init) if scale_by_init else 1.0
        self.logits = nn.Parameter(torch.full(shape, self.mask_init, device=device, dtype=dtype))
        # H(s) once hardened, as 0/1 in the weight's dtype (an in-place multiply by a bool tensor
        # is several times slower); a buffer so that a ticket's state_dict carries its mask.
        self.register_buffer("hard_mask", torch.ones(shape, device=device, dtype=dtype))
        # The temperature as a float (eager kernels take it as a scalar) and as a tensor, which
        # torch.compile'd code reads so that a new temperature does not recompile the graph.
        self.register_buffer("_temperature_tensor", self._new_temperature_tensor(1.0, device), persistent=False)
        self.temperature = 1.0
        # When > 0, the gradient of ``fused_penalty * sum(sigmoid(beta * s))`` is added inside the
        # backward pass (see MaskSet.fuse_penalty) instead of through a separate penalty term.
        self.fused_penalty = 0.0
        # The eager backward adds it once per forward-backward cycle however often the weight
        # was used (a module called twice, a siamese pair, tied weights, a recomputation under
        # activation checkpointing): the first backward after a forward pass takes it. Traced
        # code has no such state and divides it among ``uses``. A bool scalar tensor, not a
        # bool: the compiled kernels' autograd node (C++) reads and clears it too.
        self._penalty_due = _new_flag()
        self.uses = 1  # places that hold the weight: several for a tied weight (see attach_masks)
        self.attached_as: str | None = None  # the weight's name in the MaskSet that attached it
        self.positions: dict[str, int] = {}  # "<module>.<attr>" -> its index among the module's parameters
        self.mode: MaskMode = "soft"
        self._cached_mask: Tensor | None = None
        self._cache_key: tuple[Tensor, int, float] | None = None

    @property
    def temperature(self) -> float:
        """``beta`` of ``sigmoid(beta * s)``."""
        return self._temperature

    @temperature.setter
    def temperature(self, beta: float) -> None:
        set_temperature([self], beta)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .half() / .bfloat16() would round the temperature tensor (137.35 -> 137.0): it stays in
        # float32 (float64 for float64 logits), refilled from the exact float.
        module = super()._apply(fn, recurse)
        self._temperature_tensor = self._new_temperature_tensor(self._temperature, self._temperature_tensor.device)
        return module

    def _new_temperature_tensor(self, beta: float, device: torch.device | None) -> Tensor:
        return torch.full((), beta, device=device, dtype=_beta_dtype(self.logits))

    def __setstate__(self, state: dict) -> None:
        # Whole-module pickles from before the temperature tensor held a plain ``temperature``
        old_temperature = state.pop("temperature", None)
        state = {"uses": 1, "attached_as": None, "positions": {}, **state}
        due = state.get("_penalty_due", False)  # a bool before the kernels' node read it
        if not isinstance(due, Tensor):
            state["_penalty_due"] = _new_flag(bool(due))
        elif due.device.type != "cpu":  # moved by torch.load(map_location=...)
            state["_penalty_due"] = _new_flag(due.device.type != "meta" and bool(due.item()))
        super().__setstate__(state)
        if "_temperature_tensor" not in self._buffers:
            self.register_buffer("_temperature_tensor", self._new_temperature_tensor(1.0, self.logits.device),
                                 persistent=False)
        if old_temperature is not None:
            self.temperature = old_temperature

    # -- the parametrization ------------------------------------------------------------------
    def forward(self, weight: Tensor) -> Tensor:
        if self.mode == "hard":
            return weight  # mask and scale are already folded into the weight
        if _compiling():
            return _TraceableSoftMaskedWeight.apply(weight, self.logits, self._temperature_tensor, self.scale,
                                                    self.fused_penalty / self.uses)
        if _tracing():  # torch.jit.trace records plain operations (a traced graph carries no penalty)
            return weight * torch.sigmoid(self.logits * self.temperature) * self.scale
        if not torch.is_grad_enabled():
            # A forward without gradients may be reentrant activation checkpointing's first pass,
            # whose recomputation inside the backward pass does not mark the penalty as due
            _set_flag(self._penalty_due, True)
            return weight * torch.mul(self.logits, self.temperature).sigmoid_().mul_(self.scale)
        if _functorch_active():  # torch.func.grad / vmap: plain operations
            if self.fused_penalty:
                raise RuntimeError("fuse_penalty does not work under torch.func transforms: call "
                                   "fuse_penalty(0) and add coef * masks.penalty() to the loss")
            return weight * torch.sigmoid(self.logits * self.temperature) * self.scale
        if self.fused_penalty and self.__dict__.get("_is_replica"):
            raise RuntimeError("the fused penalty would be added once per nn.DataParallel replica: use "
                               "DistributedDataParallel (torchrun), or call masks.fuse_penalty(0) and add "
                               "coef * masks.penalty() to the loss")
        logits = self.logits
        if self.fused_penalty and logits.requires_grad and weight.requires_grad:
            fused = _fused_kernels(weight, logits)
            if fused is not None:  # the whole node in C++ (nothing asks for this step's mask: no cache)
                self.__dict__["_cached_mask"] = None
                return fused.soft_masked_weight(weight, logits, self._temperature, self.scale, self.fused_penalty,
                                                self._penalty_due, _graph_task_id() == -1)
        return _SoftMaskedWeight.apply(weight, logits, self._temperature, self.scale, self, self.fused_penalty)

    def _remember_mask(self, mask: Tensor, logits: Tensor) -> None:
        # This step's mask, so that the penalty need not compute it again; valid until the
        # backward pass (an optimiser step may follow it), for these very logits (not others put
        # in their place by torch.func.functional_call or load_state_dict(assign=True)) at this
        # version. Plain attributes set directly: nn.Module.__setattr__ costs microseconds, per
        # layer and step.
        self.__dict__["_cached_mask"] = mask
        self.__dict__["_cache_key"] = (logits, logits._version, self.temperature)

    # -- what methods need ----------------------------------------------------------------------
    def soft_mask_sum(self) -> Tensor:
        """``sum(sigmoid(beta * s))``, differentiable in ``s``: this tensor's L0 stand-in."""
        if self.mode == "hard":
            return _accurate_sum(self.hard_mask)
        if _compiling():
            return _accurate_sum(torch.sigmoid(self.logits * self._temperature_tensor))
        cached, key = self._cached_mask, self._cache_key
        logits = self.logits
        if cached is None or key[0] is not logits or key[1:] != (logits._version, self.temperature):
            cached = torch.mul(logits.detach(), self.temperature).sigmoid_()
        return _SoftMaskSum.apply(self.logits, cached, self.temperature)

    def binary_mask(self) -> Tensor:
        """``H(s) = 1[s > 0]`` as a bool tensor (the stored one once hardened)."""
        return self.hard_mask > 0 if self.mode == "hard" else self.logits.detach() > 0

    @torch.no_grad()
    def harden(self, weight: Tensor, apply_scale: bool = True) -> None:
        """Fold ``scale * H(s)`` into ``weight`` (the raw parameter) and freeze the logits;
        ``apply_scale=False``: only ``H(s)`` (a weight that carries the scale already)."""
        if self.mode == "hard":
            return
        self.hard_mask.copy_(self.logits > 0)
        weight.mul_(self.hard_mask)
        if apply_scale:
            weight.mul_(self.scale)
        self.logits.requires_grad_(False)
        self.mode = "hard"
        self._cached_mask = None

    @torch.no_grad()
    def zero_pruned(self, weight: Tensor) -> None:
        """Re-zero pruned entries of ``weight`` (hard mode): whatever an optimiser's momentum or
        weight decay did, a pruned weight stays exactly zero."""
        if self.mode == "hard":
            weight.mul_(self.hard_mask)

    @torch.no_grad()
    def reset_logits(self) -> None:
        """Between search rounds: ``s <- min(beta * s, s0)``, so pruned entries stay pruned while
        kept ones restart at ``s0`` with a soft mask again (DESIGN.md section 1)."""
        self.logits.mul_(self.temperature).clamp_(max=self.mask_init)
        self._cached_mask = None

    @torch.no_grad()
    def set_binary_mask(self, keep: Tensor) -> None:
        """Use a given binary mask (e.g. a saved ticket): logits become ``+1`` / ``-1``."""
        keep = keep.to(device=self.logits.device, dtype=torch.bool)
        if keep.shape != self.logits.shape:
            raise ValueError(f"mask shape {tuple(keep.shape)} != weight shape {tuple(self.logits.shape)}")
        self.logits.copy_(torch.where(keep, 1.0, -1.0))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Soft mode: logits back to ``s0``, no hard mask (for models built on the ``meta`` device
        and materialised with ``to_empty()``, whose modules are then initialised by this method).
        A hardened mask is the ticket's structure, not an initial value: it is left as it is."""
        if self.mode == "hard":
            return
        self.logits.fill_(self.mask_init)
        self.hard_mask.fill_(1.0)
        self._cached_mask = None

    def get_extra_state(self) -> dict:
        # s0 and the scaling define the network as much as the logits do: a state loaded into
        # masks attached with other settings takes the saved ones
        return {"mode": self.mode, "temperature": self.temperature, "mask_init": self.mask_init,
                "scale_by_init": self.scale_by_init}

    def set_extra_state(self, state: dict) -> None:
        if "mask_init" in state:  # states saved before these were kept hold the attached values
            self.mask_init, self.scale_by_init = float(state["mask_init"]), bool(state["scale_by_init"])
            self.scale = 1.0 / _sigmoid(self.mask_init) if self.scale_by_init else 1.0
        if self._temperature_tensor.device != self.logits.device:  # load_state_dict(assign=True) into a meta model
            self._temperature_tensor = self._new_temperature_tensor(1.0, self.logits.device)
        self.temperature = float(state["temperature"])
        self.mode = state["mode"]
        self.logits.requires_grad_(self.mode == "soft")
        self._cached_mask = None

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.logits.shape)}, mask_init={self.mask_init}, mode={self.mode}, "
                f"temperature={self.temperature:.4g}, scale={self.scale:.4g}")


_compiling = torch.compiler.is_compiling  # whether torch.compile is tracing this code
_tracing = torch._C._get_tracing_state  # not None while torch.jit.trace records
_dispatch_modes = torch._C._len_torch_dispatch_stack  # > 0 under FakeTensorMode and other dispatch modes
_graph_task_id = torch._C._current_graph_task_id  # -1 outside a backward pass
_functorch_active = torch._C._are_functorch_transforms_active  # inside torch.func.grad / vmap
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def set_temperature(masks: Iterable[ContinuousMask], beta: float) -> None:
    """``mask.temperature = beta`` for many masks, with one update of all their temperature
    tensors (one launch per device and dtype on GPUs instead of one per layer, every step when the
    temperature follows a per-step schedule)."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"the temperature must be a positive finite number, got {beta}")
    masks = list(masks)
    for mask in masks:
        mask.__dict__["_temperature"] = float(beta)  # not nn.Module.__setattr__: set every step
    if masks:
        tensors = [mask._temperature_tensor for mask in masks]
        with torch.no_grad():
            torch._foreach_zero_(tensors)
            torch._foreach_add_(tensors, float(beta))


def _accurate_sum(values: Tensor) -> Tensor:
    """A sum in float32 at least: float16 stops at 65504 (a 1000x200 layer at ``s0 = 0`` sums to
    100000, an infinite penalty), bfloat16 counts in steps of 512 there."""
    return values.sum(dtype=torch.float32) if values.dtype in (torch.float16, torch.bfloat16) else values.sum()


def _beta_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))

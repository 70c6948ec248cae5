"""Sparse CPU inference: run each sparse enough Linear layer with PyTorch's CSR kernels.

:func:`to_sparse` traces the model with ``torch.fx`` and replaces every ``nn.Linear`` by a direct
call of the faster of two kernels, measured on this machine at the batch size given: the dense
``F.linear`` or a CSR matrix product (``torch.addmv`` at batch 1, ``torch.addmm`` above). The
choice is per layer, so the converted model is never slower than dense layer by layer; inlining
the layers also drops ``nn.Module`` call overhead, which matters at batch 1 (``kernels="dense"``
gives the same inlined graph with dense kernels only, to tell the two gains apart). Conv layers stay
dense: PyTorch has no sparse convolution kernel on the CPU. Models that ``torch.fx`` cannot trace
get their Linear modules swapped in place instead.

At batch 1 a small network's forward is mostly per-operator dispatch, not arithmetic: a dense
LeNet-300-100 spends about half of its ~90 us outside its matrix products. So when the traced graph
is a plain chain (``flatten(1)``, then Linear layers with optional ReLUs), a single input takes a
vector path: one ``addmv`` (CSR or dense) and one in-place ReLU per layer on a 1-D tensor, no
reshapes, no module calls, and hidden units the ticket left dead dropped from the matrices. The
path is generated as straight-line code and, when no hooks are registered, entered without
``nn.Module.__call__``'s machinery: each of these saves microseconds of a 10-30 us forward.
"""

from __future__ import annotations

import copy
import functools
import itertools
import linecache
import re
import threading
import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules import module as hook_registry  # nn.Module's global hooks live there

from contsparse.masking import ContinuousMask
from contsparse.timing import interleaved_times

Kernels = Literal["auto", "dense", "sparse"]
KERNELS = ("auto", "dense", "sparse")


def csr_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` with a sparse CSR ``weight`` (matrix-vector kernel for a single input), in
    ``F.linear``'s layout: a caller may ``view`` the result."""
    return csr_linear_t(x, weight, bias).contiguous()


def csr_linear_t(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """:func:`csr_linear` whose result (batches of more than one input) is a transposed view.

    MKL's CSR x dense product wants a row-major right-hand side, i.e. x transposed, and gives
    the result transposed. Returned as such (no copy), elementwise ops keep that layout, the next
    CSR layer's transpose is free, and dense layers take it through BLAS's transpose flag; a
    ``view`` of it fails, so :func:`to_sparse` uses this only where the result reaches nothing else.
    """
    if x.dim() == 2 and x.shape[0] == 1:
        row = x[0]
        out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)
        return out.unsqueeze(0)
    flat = x.reshape(-1, x.shape[-1]).t().contiguous()
    out = torch.mm(weight, flat)
    if bias is not None:
        out.add_(bias.unsqueeze(1))
    out = out.t()
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], weight.shape[0])


def dense_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``, with the matrix-vector kernel for a single input (``addmm`` with one row is
    several times slower than ``addmv`` on the CPU)."""
    if x.dim() == 2 and x.shape[0] == 1:
        row = x[0]
        return (torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)).unsqueeze(0)
    return F.linear(x, weight, bias)


def to_csr(weight: Tensor) -> Tensor:
    """CSR copy of ``weight`` with 32-bit indices: with 64-bit ones every MKL call first converts
    them (a third of a layer's time at batch 256, half of it at batch 1)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = weight.detach().to_sparse_csr()
        return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape)


class SparseLinear(nn.Module):
    """A Linear layer computing with a CSR copy of its weight (used where ``torch.fx`` cannot
    trace). ``weight`` stays dense for code that reads it instead of calling the layer, as
    MultiheadAttention does with its ``out_proj``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("weight_csr", to_csr(linear.weight), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return csr_linear(x, self.weight_csr, self.bias)


def zero_fraction(weight: Tensor) -> float:
    return 1.0 - (weight != 0).float().mean().item()


def faster_kernel(linear: nn.Linear, batch_size: int, rounds: int = 7, calls: int = 50) -> str:
    """``"sparse"`` if the CSR kernel beats ``F.linear`` on this machine at ``batch_size`` by 10 %
    (median of interleaved rounds), else ``"dense"`` (also where PyTorch has no CSR kernel for the
    weight's dtype, e.g. bfloat16)."""
    csr = _csr_with_kernel(linear, batch_size)
    if csr is None:
        return "dense"
    x = torch.randn(batch_size, linear.in_features, dtype=linear.weight.dtype)
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    with torch.inference_mode():
        times = interleaved_times({"dense": lambda: dense_linear(x, weight, bias),
                                   "sparse": lambda: csr_linear_t(x, csr, bias)}, rounds, calls, warmup=5)
    return "sparse" if times["sparse"] < 0.9 * times["dense"] else "dense"


def has_csr_kernel(linear: nn.Linear, batch_size: int) -> bool:
    """Whether PyTorch has a CSR product for this layer's dtype and device at ``batch_size`` (none
    for float16 or bfloat16 on the CPU, for instance): tried on a small input of that shape."""
    return _csr_with_kernel(linear, batch_size) is not None


def _csr_with_kernel(linear: nn.Linear, batch_size: int) -> Tensor | None:
    """The layer's CSR copy if PyTorch can multiply with it at ``batch_size``, else None."""
    x = torch.zeros(batch_size, linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
    bias = None if linear.bias is None else linear.bias.detach()
    with torch.inference_mode():
        try:
            csr = to_csr(linear.weight)
            csr_linear(x, csr, bias)
        except (NotImplementedError, RuntimeError):
            return None
    return csr


def to_sparse(model: nn.Module, batch_size: int = 1, kernels: Kernels = "auto",
              min_zero_fraction: float = 0.5) -> nn.Module:
    """An inference copy of ``model`` whose sparse Linear layers run on CSR kernels where faster.

    ``kernels="auto"`` measures each layer with at least ``min_zero_fraction`` zeros at
    ``batch_size``; ``"sparse"`` / ``"dense"`` force one kernel. The chosen kernel of each layer
    is in the returned module's ``kernel_choices``. The result is for inference only (no gradients)
    and shares nothing with ``model``, which is left as it was (train or eval mode). ``"sparse"``
    on a layer PyTorch has no CSR product for (float16 or bfloat16 on the CPU) raises ValueError.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if any(isinstance(module, ContinuousMask) and module.mode == "soft" for module in model.modules()):
        raise ValueError("the model has soft CS masks attached: its weights are computed at each call, so no "
                         "layer would run sparse; call masks.harden() or masks.make_permanent() first")
    model = copy.deepcopy(model).eval()  # the graph keeps the model's other modules (conv, norm)
    choices: dict[str, str] = {}

    def choose(name: str, linear: nn.Linear) -> str:
        if kernels == "sparse" and not has_csr_kernel(linear, batch_size):
            raise ValueError(f"kernels='sparse': PyTorch has no CSR product for {name}'s "
                             f"{str(linear.weight.dtype).removeprefix('torch.')} weights at batch size {batch_size} "
                             "on this device; use kernels='auto', which keeps such layers dense")
        if kernels != "auto":
            choice = kernels
        elif zero_fraction(linear.weight) < min_zero_fraction:
            choice = "dense"
        else:
            choice = faster_kernel(linear, batch_size)
        choices[name] = choice
        return choice

    # A model with hooks of its own is not traced (tracing calls forward itself, skipping them);
    # one that cannot be traced (data-dependent control flow, ...) neither: both get their
    # Linear modules swapped in place instead
    traced = None if _has_hooks(model) else _trace_or_none(model)
    if traced is None:
        return SparseInference(_swap_modules(model, choose), None, choices)
    converted = _inline_linears(traced, choose)
    chain = _vector_chain(converted)
    return SparseInference(converted, None if chain is None else _drop_dead_units(chain), choices)


Layer = tuple[Tensor, Tensor | None, bool]  # weight (CSR or dense), bias, ReLU after it


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or a subclass that keeps its forward) without hooks: safe to replace by a
    kernel call. A subclass with a forward of its own, or a hooked layer, is left as it is."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and not _has_hooks(module)


class _KernelsAsLeaves(fx.Tracer):
    """``torch.fx``'s tracer with :func:`csr_linear` and :func:`dense_linear` as leaf functions.
    Unpickling a GraphModule traces its code again with the tracer that made it: the kernels'
    Python bodies (a branch on the batch size) must stay calls, not be traced into."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(autowrap_functions=(csr_linear, csr_linear_t, dense_linear))


def _trace_or_none(model: nn.Module) -> fx.GraphModule | None:
    try:
        return _trace(model)
    except Exception:  # whatever stops torch.fx: the caller converts without a graph
        return None


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _KernelsAsLeaves()
    graph = tracer.trace(model)
    for node in graph.nodes:  # string annotations (``from __future__ import annotations``) do not pickle
        if isinstance(node.type, str):
            node.type = None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _graph_call(graph: nn.Module) -> Callable:
    """``graph.forward``, skipping ``nn.Module.__call__`` (microseconds at batch 1), unless the
    graph is the user's own model with hooks (converted in place), whose hooks must run."""
    return graph.__call__ if _has_hooks(graph) else graph.forward


_NO_INPUT = object()  # SparseInference called without a positional input: nn.Module.__call__ decides
# nn.Module.__call__ reads these global hook registries (private names, mutated in place, never
# rebound); where a torch version lacks one, every call takes nn.Module.__call__.
_GLOBAL_HOOKS_KNOWN = all(hasattr(hook_registry, name) for name in (
    "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks", "_global_backward_hooks"))
_global_forward_pre_hooks = getattr(hook_registry, "_global_forward_pre_hooks", None)
_global_forward_hooks = getattr(hook_registry, "_global_forward_hooks", None)
_global_backward_pre_hooks = getattr(hook_registry, "_global_backward_pre_hooks", None)
_global_backward_hooks = getattr(hook_registry, "_global_backward_hooks", None)
_tracing_state = torch._C._get_tracing_state


# Serialises turning the direct call off (a hook registered, forward or the compiled call set) with
# turning it back on: otherwise a call in another thread could turn it on between the two steps of
# a registration, and the new hook would be skipped for good.
_DIRECT_CALL_LOCK = threading.RLock()


def _turns_off_direct_call(register: Callable) -> Callable:
    """``nn.Module.register_*_hook`` that then sends every call through ``nn.Module.__call__``."""
    @functools.wraps(register)
    def register_hook(self: SparseInference, *args, **kwargs):
        with _DIRECT_CALL_LOCK:
            handle = register(self, *args, **kwargs)
            self.__dict__["_direct_call"] = None
        return handle
    return register_hook


class SparseInference(nn.Module):
    """What :func:`to_sparse` returns: the converted graph, plus the vector path for single inputs
    of a plain Linear/ReLU chain. ``kernel_choices`` names each Linear layer's kernel.

    A single batch-1 tensor enters the vector path without ``nn.Module.__call__`` when that would
    only call ``forward``: its machinery costs about a tenth of the vector path
    (benchmarks/inference.py). Whether it would is kept in ``_direct_call`` instead of being
    checked at every call, where each attribute read costs a measurable share of a 10-30 us forward:
    registering a module hook, ``.compile()`` or assigning ``forward`` turns the direct call off,
    and ``nn.Module.__call__`` turns it back on once none of these is left. Global hooks and
    tracing are checked at every call. Subclasses that override ``forward`` never call directly.
    """

    def __init__(self, graph: nn.Module, chain: list[Layer] | None, kernel_choices: dict[str, str]) -> None:
        super().__init__()
        self.graph = graph
        self.kernel_choices = kernel_choices
        self._graph_forward = _graph_call(graph)
        self._chain = chain
        self._vector_forward = None if chain is None else _straight_line(chain)
        self._direct_call = None
        self._restore_direct_call()
        self.train(False)  # its graph computes in eval mode whatever mode the converted model was in

    @property
    def has_vector_path(self) -> bool:
        return self._chain is not None

    def _takes_vector_path(self, x: object) -> bool:
        return self._vector_forward is not None and isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] == 1

    def forward(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and self._takes_vector_path(args[0]):
            return self._vector_forward(args[0])
        return self._graph_forward(*args, **kwargs)

    def __call__(self, x=_NO_INPUT, /, *args, **kwargs):
        direct = self._direct_call
        if direct is not None:
            if not args and not kwargs and type(x) is Tensor and not (
                    _global_forward_pre_hooks or _global_forward_hooks or _global_backward_pre_hooks
                    or _global_backward_hooks) and x.dim() >= 2 and x.shape[0] == 1 and not _tracing_state():
                return direct(x)
        elif self._vector_forward is not None:
            self._restore_direct_call()
        return super().__call__(*args, **kwargs) if x is _NO_INPUT else super().__call__(x, *args, **kwargs)

    def _restore_direct_call(self) -> None:
        """The direct call again once ``nn.Module.__call__`` would only call this ``forward``."""
        with _DIRECT_CALL_LOCK:
            if self._may_call_directly():
                self.__dict__["_direct_call"] = self._vector_forward

    def _may_call_directly(self) -> bool:
        assigned = self.__dict__.get("forward")  # None, or the bound forward put back by assignment
        own_forward = assigned is None or (getattr(assigned, "__func__", None) is SparseInference.forward
                                           and getattr(assigned, "__self__", None) is self)
        return (self._vector_forward is not None and _GLOBAL_HOOKS_KNOWN and own_forward
                and type(self).forward is SparseInference.forward and type(self)._call_impl is nn.Module._call_impl
                and not _has_hooks(self) and self._compiled_call_impl is None)

    # -- copies: the generated vector path and bound methods are made again, CSR tensors pickle --
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for name in ("_graph_forward", "_vector_forward", "_direct_call"):
            state.pop(name, None)
        state["_plain_tensors"] = [name for name, value in vars(self.graph).items() if isinstance(value, Tensor)]
        return state

    def __setstate__(self, state: dict) -> None:
        plain_tensors = state.pop("_plain_tensors", [])
        super().__setstate__(state)
        # torch.fx rebuilds a graph's tensor attributes as buffers (when unpickling or deep copying
        # it): they go back to plain attributes, as in the original (same state_dict, fast reads)
        buffers = self.graph._buffers
        for name in plain_tensors:
            if name in buffers:
                object.__setattr__(self.graph, name, buffers.pop(name))
                self.graph._non_persistent_buffers_set.discard(name)
        self.__dict__["_graph_forward"] = _graph_call(self.graph)
        self.__dict__["_vector_forward"] = None if self._chain is None else _straight_line(self._chain)
        self.__dict__["_direct_call"] = None
        self._restore_direct_call()

    def __deepcopy__(self, memo: dict) -> SparseInference:
        # copy.deepcopy cannot copy a CSR tensor (it reads the tensor's storage): clones of them
        # go into the memo first, so that the deep copy takes those
        for tensor in self._csr_tensors():
            memo.setdefault(id(tensor), torch.sparse_csr_tensor(
                tensor.crow_indices().clone(), tensor.col_indices().clone(), tensor.values().clone(), tensor.shape))
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # The kernels' tensors are plain attributes and globals of the generated vector path, which
        # .to(), .double() or .half() cannot reach: refused, rather than half the model cast.
        for tensor in self._kernel_tensors():
            moved = fn(tensor)
            if moved.dtype != tensor.dtype or moved.device != tensor.device:
                raise RuntimeError("a model converted by to_sparse keeps its kernels' tensors as they are: cast or "
                                   "move the model before converting it, e.g. to_sparse(model.double())")
        return super()._apply(fn, recurse)

    def _kernel_tensors(self) -> list[Tensor]:
        """The inlined layers' weights and biases (the graph's plain tensor attributes, the chain's)."""
        found = [t for layer in self._chain or [] for t in layer[:2]]
        found += list(vars(self.graph).values())
        return [t for t in found if isinstance(t, Tensor)]

    def _csr_tensors(self) -> list[Tensor]:
        """The CSR tensors held as plain attributes (the graph's), buffers (swapped layers) or in the chain."""
        found = [weight for weight, _, _ in self._chain or []]
        for module in self.modules():
            found += [*vars(module).values(), *module._buffers.values()]
        return [t for t in found if isinstance(t, Tensor) and t.layout == torch.sparse_csr]

    def __setattr__(self, name: str, value: object) -> None:
        if name not in ("forward", "_compiled_call_impl"):
            super().__setattr__(name, value)
            return
        with _DIRECT_CALL_LOCK:  # nn.Module.__call__ must call what is set
            super().__setattr__(name, value)
            self.__dict__["_direct_call"] = None

    register_forward_pre_hook = _turns_off_direct_call(nn.Module.register_forward_pre_hook)
    register_forward_hook = _turns_off_direct_call(nn.Module.register_forward_hook)
    register_full_backward_pre_hook = _turns_off_direct_call(nn.Module.register_full_backward_pre_hook)
    register_full_backward_hook = _turns_off_direct_call(nn.Module.register_full_backward_hook)
    register_backward_hook = _turns_off_direct_call(nn.Module.register_backward_hook)


def _straight_line(chain: list[Layer]) -> Callable[[Tensor], Tensor]:
    """The vector path as one generated function of straight-line calls (like the code torch.fx
    writes), with the layers' tensors as its globals: a loop over the layers, or a module attribute
    read per tensor, costs a measurable share of a ~10 us forward.

    Hidden layers write into buffers made once per thread (``out=``), which saves an allocation per
    layer (about a tenth of the path); the output is a fresh tensor. An input that requires grad
    takes the same calls without buffers, since ``out=`` does not record gradients."""
    namespace: dict[str, object] = {"addmv": torch.addmv, "mv": torch.mv, "per_thread": threading.local(),
                                    "new_buffers": functools.partial(_hidden_buffers, chain)}
    hidden = [f"h_{i}" for i in range(len(chain) - 1)]
    for i, (weight, bias, _) in enumerate(chain):
        namespace[f"weight_{i}"], namespace[f"bias_{i}"] = weight, bias
    source = _vector_function("vector_forward", chain, hidden)
    if hidden:  # the buffers' variant, with a fallback to the plain one
        unpack = ", ".join(hidden) + ","
        source = _vector_function("plain_forward", chain, []) + "\n" + _vector_function(
            "vector_forward", chain, hidden, ["    if x.requires_grad:", "        return plain_forward(x)",
                                              "    try:", f"        {unpack} = per_thread.buffers",
                                              "    except AttributeError:",
                                              f"        {unpack} = per_thread.buffers = new_buffers()"])
    filename = f"<contsparse vector path {next(_vector_paths)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show it
    exec(compile(source, filename, "exec"), namespace)  # our own template: no user text goes in
    return namespace["vector_forward"]  # type: ignore[return-value]


def _vector_function(name: str, chain: list[Layer], buffers: list[str], prologue: list[str] = ()) -> str:
    """Source of one vector-path function: layer ``i`` writes into ``buffers[i]`` where given."""
    lines = [f"def {name}(x):", *prologue, "    v = x.reshape(-1)"]
    for i, (_, bias, relu) in enumerate(chain):
        out = f", out={buffers[i]}" if i < len(buffers) else ""
        call = f"mv(weight_{i}, v{out})" if bias is None else f"addmv(bias_{i}, weight_{i}, v{out})"
        lines.append(f"    v = {call}{'.relu_()' if relu else ''}")  # relu_ on the kernel's own output
    lines.append("    return v.unsqueeze(0)")
    return "\n".join(lines) + "\n"


def _hidden_buffers(chain: list[Layer]) -> tuple[Tensor, ...]:
    """One thread's output buffers of the hidden layers: normal tensors even when first made under
    ``torch.inference_mode`` (an inference tensor cannot be written outside it)."""
    with torch.inference_mode(False):
        return tuple(torch.empty(weight.shape[0], dtype=weight.dtype) for weight, _, _ in chain[:-1])


_vector_paths = itertools.count()


def _drop_dead_units(chain: list[Layer]) -> list[Layer]:
    """The chain without hidden units that a sparse ticket leaves dead, each layer keeping its kernel.

    A unit whose outgoing weights are all zero cannot change the output: it is dropped. A unit
    whose incoming weights are all zero outputs the constant ``act(bias)``: its share of the next
    layer is folded into that layer's bias (exactly, when the constant is zero) and it is dropped.
    The LeNet-300-100 ticket of benchmarks/inference.py (1.71 % of the weights) loses 66 of its 400
    hidden units this way, which shrinks the dense matrix-vector products of the vector path.
    """
    layers = [[weight.to_dense() if weight.layout != torch.strided else weight, bias, relu]
              for weight, bias, relu in chain]
    changed = True
    while changed:  # dropping a layer's units can leave units of the layer before it unused
        changed = False
        for i in range(len(layers) - 1):
            changed |= _drop_units(layers[i], layers[i + 1])
    # Layers left as they were keep their tensors (shared with the graph path), the others are new
    return [original if weight.shape == original[0].shape and bias is original[1]
            else (to_csr(weight) if original[0].layout != torch.strided else weight.contiguous(), bias, relu)
            for (weight, bias, relu), original in zip(layers, chain, strict=True)]


def _drop_units(layer: list, following: list) -> bool:
    """Drop the dead units between two ``[weight, bias, relu]`` layers; whether any were."""
    weight, bias, relu = layer
    unused = (following[0] == 0).all(0)
    constant = (weight == 0).all(1) & ~unused
    keep = ~(unused | constant)
    if keep.all() or not keep.any():  # nothing to drop, or an empty layer: leave it as it is
        return False
    value = weight.new_zeros(weight.shape[0]) if bias is None else bias.clamp(min=0) if relu else bias
    folded = constant & (value != 0)
    if folded.any():
        base = following[1] if following[1] is not None else weight.new_zeros(following[0].shape[0])
        following[1] = base + following[0][:, folded] @ value[folded]
    layer[0], layer[1] = weight[keep], None if bias is None else bias[keep]
    following[0] = following[0][:, keep]
    return True


_RELUS = (torch.relu, torch.relu_, F.relu)
_LINEARS = (csr_linear, csr_linear_t, dense_linear)


def _vector_chain(traced: fx.GraphModule) -> list[Layer] | None:
    """The layers of ``flatten(1) -> (linear -> [relu])* -> output``, or None for any other graph."""
    layers: list[Layer] = []
    current = None  # the node the chain has reached
    for node in traced.graph.nodes:
        if node.op == "get_attr":
            continue
        if node.op == "placeholder":
            if current is not None:
                return None
            current = node
        elif current is not None and current.op == "placeholder" and _is_flatten_1(traced, node, current):
            current = node
        elif node.op == "call_function" and node.target in _LINEARS and node.args[0] is current \
                and current.op != "placeholder":
            weight, bias = (getattr(traced, a.target) if a is not None else None for a in node.args[1:3])
            layers.append((weight, bias, False))
            current = node
        elif node.op == "call_function" and node.target in _RELUS and node.args[0] is current \
                and layers and not layers[-1][2] and current.target in _LINEARS:
            layers[-1] = (*layers[-1][:2], True)
            current = node
        elif node.op == "output" and node.args[0] is current and layers:
            return layers
        else:
            return None
    return None


def _is_flatten_1(traced: fx.GraphModule, node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` is ``source.flatten(1)``: method, function or ``nn.Flatten()`` module."""
    if node.args[:1] != (source,):
        return False
    if node.op == "call_module":
        module = traced.get_submodule(str(node.target))
        return type(module) is nn.Flatten and module.start_dim == 1 and module.end_dim == -1 and not _has_hooks(module)
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    flatten = (node.op == "call_method" and node.target == "flatten") or \
        (node.op == "call_function" and node.target is torch.flatten)
    return flatten and start == 1 and end == -1


def _inline_linears(traced: fx.GraphModule, choose: Callable[[str, nn.Linear], str]) -> fx.GraphModule:
    graph = traced.graph
    modules = dict(traced.named_modules())
    taken = set(dir(traced))
    for node in list(graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        source = _single_input(node)
        if source is None:
            continue  # called with keyword or extra arguments: left as a module call
        if _plain_linear(module):
            sparse = choose(str(node.target), module) == "sparse"
            weight_attr = _free_name(taken, f"_cs_{node.target}_weight")
            bias_attr = _free_name(taken, f"_cs_{node.target}_bias")
            weight = to_csr(module.weight) if sparse else module.weight.detach().clone()
            bias = None if module.bias is None else module.bias.detach().clone()
            # Plain attributes, not buffers: reading a buffer goes through nn.Module.__getattr__,
            # a few microseconds per tensor per call, which is most of a batch-1 forward here.
            object.__setattr__(traced, weight_attr, weight)
            object.__setattr__(traced, bias_attr, bias)
            with graph.inserting_before(node), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # fx expects get_attr targets to be buffers
                args = (source, graph.get_attr(weight_attr), graph.get_attr(bias_attr) if bias is not None else None)
                call = graph.call_function(csr_linear if sparse else dense_linear, args)
            node.replace_all_uses_with(call)
            graph.erase_node(node)
        elif type(module) is nn.ReLU and not _has_hooks(module):
            with graph.inserting_before(node):  # in place stays in place: other uses see the change
                call = graph.call_function(torch.relu_ if module.inplace else torch.relu, (source,))
            node.replace_all_uses_with(call)
            graph.erase_node(node)
    for node in graph.nodes:  # a transposed result where only linear layers read it, through ReLUs
        if node.op == "call_function" and node.target is csr_linear and _only_reaches_linears(node):
            node.target = csr_linear_t
    traced.delete_all_unused_submodules()
    graph.lint()
    traced.recompile()
    return traced


def _only_reaches_linears(node: fx.Node) -> bool:
    """Whether every use of ``node``'s result is the input of a linear kernel, directly or through
    ReLUs (which keep a tensor's layout): then it may be a transposed view."""
    for user in node.users:
        if user.op == "call_function" and user.target in _LINEARS and user.args[0] is node \
                and node not in user.args[1:]:
            continue
        if user.op == "call_function" and user.target in _RELUS and user.args[:1] == (node,) \
                and node not in user.args[1:] and set(user.kwargs) <= {"inplace"} and _only_reaches_linears(user):
            continue
        return False
    return True


def _single_input(node: fx.Node) -> fx.Node | None:
    """The one input of a module call ``m(x)`` or ``m(input=x)``; None for any other call."""
    if len(node.args) == 1 and not node.kwargs:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if not node.args and set(node.kwargs) == {"input"}:
        return node.kwargs["input"] if isinstance(node.kwargs["input"], fx.Node) else None
    return None


def _free_name(taken: set[str], base: str) -> str:
    """``base`` made an identifier that no attribute of the graph module has (nor an earlier result)."""
    name = candidate = re.sub(r"\W", "_", base)
    for i in itertools.count(1):
        if name not in taken:
            break
        name = f"{candidate}_{i}"
    taken.add(name)
    return name


def _swap_modules(model: nn.Module, choose: Callable[[str, nn.Linear], str]) -> nn.Module:
    for name, module in list(model.named_modules()):
        if name and _plain_linear(module) and choose(name, module) == "sparse":
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, SparseLinear(module))
    return model

"""The fused CPU kernels of the soft mask agree with the PyTorch operations they replace."""

import contextlib
import copy
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import contsparse as cs
from contsparse.masking import kernels

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernels")


def masked_step(module: nn.Module, x: torch.Tensor, penalty: float, temperature: float = 3.0):
    """Output, weight and logit gradients and the reported penalty of one search step."""
    torch.manual_seed(0)
    model = module
    masks = cs.attach_masks(model, mask_init=0.1, selection=cs.LayerSelection(exclude_first=False))
    with torch.no_grad():
        for logits in masks.mask_parameters():
            logits.normal_(0.0, 0.5)
    masks.temperature = temperature
    masks.fuse_penalty(penalty)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [p.grad.clone() for p in [*masks.weight_parameters(), *masks.mask_parameters()]]
    return out.detach(), grads, masks.penalty().detach()


def assert_close_to_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding: the kernels multiply in another order than the eager ops."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def models():
    torch.manual_seed(1)
    linear = nn.Sequential(nn.Linear(300, 70), nn.ReLU(), nn.Linear(70, 5))  # 21000 entries: two threads' work
    torch.manual_seed(2)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    return {"linear": (linear, torch.randn(4, 300)), "conv": (conv, torch.randn(2, 3, 8, 8))}


def compare(name: str, penalty: float) -> None:
    module, x = models()[name]
    assert kernels.load() is not None, kernels.failure()
    fused = masked_step(copy.deepcopy(module), x, penalty)
    with kernels.switched_off():
        reference = masked_step(copy.deepcopy(module), x, penalty)
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(fused[1], reference[1], strict=True):
        assert_close_to_rounding(got, want)
    torch.testing.assert_close(fused[2], reference[2])


@needs_compiler
@pytest.mark.parametrize("penalty", [0.0, 1e-3])  # with the penalty fused the mask is recomputed, not stored
@pytest.mark.parametrize("name", ["linear", "conv"])
def test_fused_kernels_match_the_eager_operations(name, penalty):
    compare(name, penalty)


@needs_compiler
def test_the_penalty_reuses_the_mask_the_kernel_kept():
    layer = nn.Linear(50, 40)
    masks = cs.attach_masks(layer, selection=cs.LayerSelection(exclude_first=False))
    masks.temperature = 2.0
    layer(torch.randn(2, 50))
    mask = masks.masks["weight"]
    assert mask._cached_mask is not None  # no fused penalty: the forward kept its mask for the penalty
    assert float(masks.penalty()) == pytest.approx(float(torch.sigmoid(2.0 * mask.logits.detach()).sum()), rel=1e-6)


@needs_compiler
def test_layouts_the_kernels_do_not_take_fall_back_to_the_eager_operations(monkeypatch):
    """A channels-last conv weight (not contiguous) and a non-contiguous incoming gradient."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last)
    linear = nn.Linear(30, 20)
    results = []
    for eager in (False, True):
        if eager:
            monkeypatch.setitem(kernels._state, "module", None)
            monkeypatch.setitem(kernels._state, "failure", "switched off by the test")
        c, lin = copy.deepcopy(conv), copy.deepcopy(linear)
        masks = cs.attach_masks(nn.ModuleList([c, lin]), selection=cs.LayerSelection(exclude_first=False))
        masks.temperature = 4.0
        masks.fuse_penalty(1e-2)
        weight = torch.linspace(-1, 1, 20 * 30).view(30, 20)
        x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(0))
        loss = c(x).sum() + (lin.weight.t() * weight).sum()
        loss.backward()
        masked = [m.parametrizations.weight.original for m in (c, lin)]
        results.append([p.grad.clone() for p in [*masked, *masks.mask_parameters()]])
    for got, want in zip(*results, strict=True):
        assert_close_to_rounding(got, want)


def test_a_failed_build_warns_once_and_the_masks_still_work(monkeypatch):
    monkeypatch.setitem(kernels._state, "module", None)
    monkeypatch.setitem(kernels._state, "failure", None)
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")

    def no_compiler():
        raise RuntimeError("Error building extension 'contsparse_soft_mask': c++: not found\nmore detail")

    monkeypatch.setattr(kernels, "_build", no_compiler)
    layer = nn.Linear(20, 10)
    masks = cs.attach_masks(layer, selection=cs.LayerSelection(exclude_first=False))
    masks.fuse_penalty(1e-3)
    with pytest.warns(RuntimeWarning, match=r"could not be built \(Error building extension 'contsparse_soft_mask'"
                                            r": c\+\+: not found\); the masks use PyTorch operations"):
        layer(torch.randn(3, 20)).sum().backward()
    assert kernels.failure().endswith("c++: not found")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        layer(torch.randn(3, 20)).sum().backward()
    assert masks.masks["weight"].logits.grad.abs().sum() > 0


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_the_environment_switch_turns_the_kernels_off(monkeypatch, value):
    monkeypatch.setitem(kernels._state, "module", None)
    monkeypatch.setitem(kernels._state, "failure", None)
    monkeypatch.setenv(kernels.ENV_SWITCH, value)
    monkeypatch.setattr(kernels, "_build", lambda: pytest.fail("built although switched off"))
    assert not kernels.enabled() and kernels.load() is None and kernels.failure() is None


@needs_compiler
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_the_kernels_build_and_agree_on_other_cpu_capabilities(capability):
    """Most machines are not AVX-512 ones: ATen's dispatch picks another capability there, and the
    kernels are compiled for it under their own name (torch's cache keeps each)."""
    script = ("import torch; from contsparse.masking import kernels\n"
              "k = kernels.load(); assert k is not None, kernels.failure()\n"
              "assert torch.backends.cpu.get_cpu_capability().lower() in k.__name__, k.__name__\n"
              "torch.manual_seed(0); w, s, g = torch.randn(3, 1000, 37)\n"
              "out, m = k.forward(w, s, 3.0, 1.5, True)\n"
              "want = torch.sigmoid(s * 3.0)\n"
              "torch.testing.assert_close(m, want); torch.testing.assert_close(out, w * want * 1.5)\n"
              "gw, gs = k.backward(g, w, s, False, 3.0, 1.5, 0.01)\n"
              "torch.testing.assert_close(gw, g * want * 1.5)\n"
              "torch.testing.assert_close(gs, (g * w * 1.5 + 0.01) * 3.0 * want * (1 - want))\n"
              "print(k.__name__)\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(f"contsparse_soft_mask_{capability}_")


def fused_step(model: nn.Module, masks, x: torch.Tensor) -> list[torch.Tensor]:
    masks.fuse_penalty(1e-2)
    masks.temperature = 2.0
    model(x).sum().backward()
    return [p.grad for p in masks.mask_parameters()]


@needs_compiler
def test_masks_built_on_the_meta_device_or_copied_under_inference_mode_train():
    """The penalty's flag is a CPU tensor whatever the default device, and can be set when a
    copy made under inference_mode made it an inference tensor."""
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
        masks = cs.attach_masks(net, selection=cs.LayerSelection(exclude_first=False))
    net.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.1)
    for _, mask in masks:
        mask.reset_parameters()  # logits back to s0
    assert all(mask._penalty_due.device.type == "cpu" for _, mask in masks)
    assert all(g.abs().sum() > 0 for g in fused_step(net, masks, torch.randn(4, 20)))
    with torch.inference_mode():
        twin = copy.deepcopy(net)
    with torch.no_grad():
        twin(torch.randn(2, 20))  # marks the penalty as due in the copied (inference) flag


@needs_compiler
def test_saved_tensors_unpacked_in_another_layout_take_the_formula():
    """A saved-tensor hook may hand the C++ node's backward a transposed weight: no error, the same gradients."""
    results = []
    for eager in (False, True):
        torch.manual_seed(0)
        layer = nn.Linear(20, 30)
        masks = cs.attach_masks(layer, selection=cs.LayerSelection(exclude_first=False))
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t.t().contiguous() if t.dim() == 2 else t,
                                                         lambda t: t.t() if t.dim() == 2 else t)
        with (kernels.switched_off() if eager else contextlib.nullcontext()), hooks:
            results.append(fused_step(layer, masks, torch.randn(4, 20, generator=torch.Generator().manual_seed(1))))
    assert_close_to_rounding(results[0][0], results[1][0])


@needs_compiler
def test_a_mask_a_saved_tensor_hook_moved_takes_the_eager_backward():
    """The penalty in the loss (not fused): the Python node keeps the kernel's mask for the backward
    pass, and a hook that stores activations in another layout hands it back transposed."""
    results = []
    for eager in (False, True):
        torch.manual_seed(0)
        layer = nn.Linear(20, 30)
        masks = cs.attach_masks(layer, selection=cs.LayerSelection(exclude_first=False))
        masks.temperature = 2.0

        def pack(t):
            return t if isinstance(t, nn.Parameter) or t.dim() != 2 else t.t().contiguous()

        def unpack(t):
            return t if isinstance(t, nn.Parameter) or t.dim() != 2 else t.t()

        x = torch.randn(4, 20, generator=torch.Generator().manual_seed(1))
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        with (kernels.switched_off() if eager else contextlib.nullcontext()), hooks:
            (layer(x).sum() + 1e-3 * masks.penalty()).backward()
        results.append(masks.masks["weight"].logits.grad)
    assert_close_to_rounding(results[0], results[1])


@needs_compiler
def test_the_kernels_refuse_tensors_of_another_shape():
    fused = kernels.load()
    with pytest.raises(RuntimeError, match=r"logits must be a contiguous float32 CPU tensor of shape \[6, 4\]"):
        fused.forward(torch.randn(6, 4), torch.randn(4, 6), 1.0, 1.0, True)


def test_a_failed_build_names_its_cause_not_the_command_line():
    ninja_output = ("Error building extension 'contsparse_soft_mask_avx512_0123456789': "
                    "[1/2] c++ -MMD -MF soft_mask.o.d -DTORCH_EXTENSION_NAME=x -O3 -c soft_mask.cpp -o soft_mask.o\n"
                    "FAILED: soft_mask.o\n/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.")
    assert kernels._cause(ninja_output) == "/bin/sh: 1: c++: not found"
    assert kernels._cause("something odd\nlast words") == "last words"


def test_without_a_compiler_the_build_says_so(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.setattr(kernels, "compiled", lambda: False)  # else the cached build loads without one
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler: 'no-such-compiler-here' is not on PATH"):
        kernels._build()


@needs_compiler
def test_a_lock_left_by_a_killed_build_does_not_stop_the_next_one():
    """torch waits forever for its lock file while it exists; a killed process leaves it behind."""
    from torch.utils import cpp_extension

    kernels.load()
    folder = Path(cpp_extension._get_build_directory(kernels._extension_name(), verbose=False))
    (folder / "lock").touch()
    script = "from contsparse.masking import kernels; k = kernels.load(); assert k is not None, kernels.failure()"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (folder / "lock").exists()

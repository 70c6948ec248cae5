"""Export formats, compressed storage, sparse CPU inference, ONNX, reports."""

import copy
import dataclasses
import json
import pickle
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from contsparse import attach_masks
from contsparse.cli import main
from contsparse.data import input_preprocessing
from contsparse.errors import UserError
from contsparse.experiments import Runner, make_config
from contsparse.experiments.runner import build_method
from contsparse.export import export_run, load_compressed, load_run_model, save_compressed, to_sparse
from contsparse.export.formats import _serialise, export_onnx
from contsparse.export.sparse import SparseInference
from contsparse.models import build_model, register_model
from contsparse.training import load_checkpoint

SETTINGS = dict(model="lenet300", dataset="synthetic", epochs=3, rounds=1, rewind_epoch=0, ticket_epochs=1,
                mask_init=-0.02, dense_baseline=False, device="cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    Runner(make_config(dict(SETTINGS)), out, lambda _: None).execute()
    return out


def hard_masked_model(run_dir):
    """The run's model as training left it: masks attached and hardened, state from the checkpoint."""
    config = make_config(dict(SETTINGS))
    model = build_model("lenet300", (1, 28, 28), 10)
    method = build_method(config, steps_per_epoch=1)
    method.attach(model)
    method.harden()
    model.load_state_dict(load_checkpoint(run_dir / "checkpoint")["model"])
    return model.eval()


def read_export(path, fmt: str) -> dict[str, torch.Tensor]:
    """The state_dict in an exported file, read without contsparse's export code (but the
    compressed format's loader)."""
    if fmt == "pytorch":
        return torch.load(path, weights_only=True)
    return load_compressed(path) if fmt == "compressed" else load_file(str(path))


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch", "compressed"])
def test_exported_weights_load_into_the_vanilla_model_with_identical_outputs(fmt, run_dir, tmp_path):
    state = read_export(export_run(run_dir, fmt, tmp_path / f"model.{fmt}"), fmt)
    vanilla = build_model("lenet300", (1, 28, 28), 10)  # no masks anywhere
    vanilla.load_state_dict(state)
    assert all("mask" not in key for key in state)
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(vanilla.eval()(x), hard_masked_model(run_dir)(x))


def test_compressed_storage_is_exact_and_small(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(300, 784) * (torch.rand(300, 784) < 0.03)
    state = {"w": weight, "b": torch.randn(300), "steps": torch.tensor(7)}
    save_file(state, str(tmp_path / "dense.safetensors"))
    save_compressed(state, tmp_path / "c.safetensors")
    restored = load_compressed(tmp_path / "c.safetensors")
    assert list(restored) == list(state)  # the state_dict's order too (safetensors sorts its tensors)
    for key in state:
        assert torch.equal(restored[key], state[key]) and restored[key].dtype == state[key].dtype
    ratio = (tmp_path / "c.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio < 0.04  # 3 % values + a byte per value (gaps; a bitmask would take 1/32 of float32 more)
    denser = {"w": torch.randn(300, 784) * (torch.rand(300, 784) < 0.2)}  # 20 %: the bitmask is smaller
    save_compressed(denser, tmp_path / "d.safetensors")
    assert torch.equal(load_compressed(tmp_path / "d.safetensors")["w"], denser["w"])
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"w.bitmask", "w.values"}


def test_compressed_storage_never_makes_a_name_ambiguous(tmp_path):
    """An entry named like another's compressed parts ("w.values") keeps that one uncompressed."""
    sparse = torch.zeros(64, 64)
    sparse[0, :5] = 1.0
    state = {"w": sparse, "w.values": sparse.clone() * 2, "w.bitmask": torch.arange(3)}
    save_compressed(state, tmp_path / "c.safetensors")
    restored = load_compressed(tmp_path / "c.safetensors")
    assert list(restored) == list(state)
    assert all(torch.equal(restored[key], state[key]) for key in state)


def test_a_compressed_file_of_the_bitmask_only_version_still_reads(tmp_path):
    """Files written before the gaps encoding: no "encoding" key, and a plain entry may be named
    like a gaps part ("w.gaps" beside a bitmask-coded "w")."""
    from safetensors.torch import save

    sparse = torch.zeros(4, 4)
    sparse[1, 2] = 3.0
    stored = {"w.bitmask": torch.from_numpy(np.packbits((sparse != 0).flatten().numpy())),
              "w.values": sparse[sparse != 0], "w.gaps": torch.arange(3.0)}
    metadata = {"contsparse.compressed": json.dumps({"w": {"shape": [4, 4]}}),
                "contsparse.order": json.dumps(["w", "w.gaps"])}
    (tmp_path / "old.safetensors").write_bytes(save(stored, metadata=metadata))
    restored = load_compressed(tmp_path / "old.safetensors")
    assert list(restored) == ["w", "w.gaps"] and torch.equal(restored["w"], sparse)
    assert torch.equal(restored["w.gaps"], torch.arange(3.0))


def test_compressed_storage_of_a_masked_model_says_to_make_the_masks_permanent(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    masks = attach_masks(model, mask_init=0.5)
    masks.harden()
    with pytest.raises(ValueError, match=r"make_permanent\(\) first"):
        save_compressed(model.state_dict(), tmp_path / "c.safetensors")
    save_compressed(masks.make_permanent().state_dict(), tmp_path / "c.safetensors")


def test_a_plain_file_is_not_taken_for_a_compressed_one(run_dir):
    with pytest.raises(UserError, match="not a contsparse compressed file"):
        load_compressed(run_dir / "model.safetensors")


@pytest.mark.parametrize("kernels", ["auto", "sparse", "dense"])
@pytest.mark.parametrize("batch", [1, 7])
def test_sparse_inference_matches_dense(kernels, batch, run_dir):
    model = load_run_model(run_dir).model
    converted = to_sparse(model, batch_size=batch, kernels=kernels)
    expected = {"sparse": "sparse", "dense": "dense"}.get(kernels)
    if expected:
        assert set(converted.kernel_choices.values()) == {expected}
    assert set(converted.kernel_choices) == {"hidden.0", "hidden.1", "output"}
    for n in (1, 7, 64):
        x = torch.randn(n, 1, 28, 28)
        with torch.inference_mode():
            torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


def test_single_inputs_of_a_linear_relu_chain_take_the_vector_path(run_dir):
    model = load_run_model(run_dir).model
    converted = to_sparse(model, batch_size=1)
    assert converted.has_vector_path  # LeNet-300-100: flatten, then Linear/ReLU layers
    x = torch.randn(1, 1, 28, 28)
    with torch.inference_mode():
        fast = converted(x)
        general = converted.graph(x)  # the traced graph every other batch size uses
    assert fast.shape == (1, 10)
    torch.testing.assert_close(fast, general, rtol=1e-6, atol=1e-6)

    class Residual(nn.Module):  # not a plain chain: keeps the general graph only
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) + x)

    class NoFlatten(nn.Module):  # a chain, but on (N, 8) inputs without flatten(1): general graph
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 3)

        def forward(self, x):
            return self.a(x)

    for other in (Residual().eval(), NoFlatten().eval()):
        assert not to_sparse(other, batch_size=1).has_vector_path


def test_the_vector_path_reuses_its_buffers_safely(run_dir):
    """Hidden layers write into per-thread buffers: a kept output is never overwritten by a later
    call, buffers first made under inference_mode work outside it, threads do not share them, and
    an input that requires grad gets its gradient (out= records none, so it takes plain calls)."""
    model = load_run_model(run_dir).model
    converted = to_sparse(model, batch_size=1, kernels="sparse")
    inputs = [torch.randn(1, 1, 28, 28) for _ in range(4)]
    with torch.inference_mode():
        expected = [converted.graph(x) for x in inputs]
        first = converted(inputs[0])  # the buffers are made here, under inference_mode
        converted(inputs[1])
    torch.testing.assert_close(first, expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(converted(inputs[1]), expected[1], rtol=1e-6, atol=1e-6)  # outside it

    results: dict[int, bool] = {}

    def calls(i: int) -> None:
        results[i] = all(torch.allclose(converted(inputs[i]), expected[i], rtol=1e-6, atol=1e-6) for _ in range(300))

    threads = [threading.Thread(target=calls, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: True for i in range(4)}

    x = inputs[2].clone().requires_grad_()
    converted(x).sum().backward()
    reference = inputs[2].clone().requires_grad_()
    model(reference).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-5)


def test_single_inputs_skip_module_call_machinery_but_not_hooks(run_dir, monkeypatch):
    model = load_run_model(run_dir).model
    x = torch.randn(1, 1, 28, 28)
    with torch.inference_mode():
        expected = model(x)

    def check(module, reference=expected, tolerance=1e-6):
        with torch.inference_mode():
            torch.testing.assert_close(module(x), reference, rtol=tolerance, atol=tolerance)

    def forbidden(*args):
        raise AssertionError("nn.Module.__call__ ran forward")

    with monkeypatch.context() as patch:  # no hooks: the vector path is entered without forward
        patch.setattr(SparseInference, "forward", forbidden)
        check(to_sparse(model, batch_size=1))

    overridden = to_sparse(model, batch_size=1)  # an instance's own forward is what a call runs
    own_forward = overridden.forward
    overridden.forward = lambda inputs: torch.zeros(1, 10)
    check(overridden, torch.zeros(1, 10))
    del overridden.forward
    check(overridden)
    assert overridden._direct_call is not None
    overridden.forward = lambda inputs: torch.zeros(1, 10)
    check(overridden, torch.zeros(1, 10))
    overridden.forward = own_forward  # put back by assignment (as accelerate's remove_hook_from_module does)
    check(overridden)
    assert overridden._direct_call is not None

    class Subclass(SparseInference):  # a subclass's forward is what a call runs
        def forward(self, x):
            return torch.ones(len(x), 10)

    base = to_sparse(model, batch_size=1)
    check(Subclass(base.graph, base._chain, base.kernel_choices), torch.ones(1, 10))

    hooked = to_sparse(model, batch_size=1)
    seen = []
    pre = hooked.register_forward_pre_hook(lambda module, args: (torch.as_tensor(args[0]) * 0,))  # also converts
    post = hooked.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    with torch.inference_mode():
        torch.testing.assert_close(hooked(x), model(x * 0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hooked(x.numpy()), model(x * 0), rtol=1e-6, atol=1e-6)  # hook runs first
        torch.testing.assert_close(hooked(torch.cat([x, x])), model(torch.cat([x, x]) * 0), rtol=1e-5, atol=1e-5)
    assert seen == [(1, 10), (1, 10), (2, 10)]
    pre.remove()
    check(hooked)  # the forward hook still runs
    assert seen[-1] == (1, 10) and len(seen) == 4
    post.remove()
    with monkeypatch.context() as patch:  # no hooks left: direct again
        check(hooked)
        patch.setattr(SparseInference, "forward", forbidden)
        check(hooked)
    for register in ("register_full_backward_pre_hook", "register_full_backward_hook", "register_backward_hook"):
        backward_hooked = to_sparse(model, batch_size=1)
        getattr(backward_hooked, register)(lambda *args: None)
        with monkeypatch.context() as patch:
            patch.setattr(SparseInference, "forward", forbidden)
            with pytest.raises(AssertionError, match="ran forward"):
                backward_hooked(x)

    plain = to_sparse(model, batch_size=1)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: calls.append(module))
    try:
        check(plain)
    finally:
        handle.remove()
    assert plain in calls  # global hooks run too
    with torch.inference_mode():
        torch.testing.assert_close(plain(x=x), expected, rtol=1e-6, atol=1e-6)  # keyword input: nn.Module.__call__
        with pytest.raises(TypeError):
            plain()  # no input: forward's own error

    compiled = to_sparse(model, batch_size=1)
    compiled.compile(backend="eager")  # a compiled module keeps running its compiled call (no C++ compiler needed)
    assert compiled._direct_call is None
    compiled_call, compiled_calls = compiled._compiled_call_impl, []
    compiled._compiled_call_impl = lambda *args, **kwargs: compiled_calls.append(1) or compiled_call(*args, **kwargs)
    check(compiled, tolerance=1e-5)
    assert compiled_calls == [1]


def test_a_call_during_a_hook_registration_does_not_lose_the_hook(run_dir):
    # Another thread may call the model while a hook is being registered. Made deterministic here:
    # the hooks dict calls the model just before the new hook lands in it. Turning the direct call
    # off before the registration (instead of after) let that call turn it back on for good.
    sparse = to_sparse(load_run_model(run_dir).model, batch_size=1)
    x = torch.randn(1, 1, 28, 28)

    class CallsFirst(OrderedDict):
        def __setitem__(self, key, value):
            with torch.inference_mode():
                sparse(x)
            super().__setitem__(key, value)

    sparse._forward_hooks = CallsFirst()
    calls = []
    sparse.register_forward_hook(lambda module, args, out: calls.append(1))
    with torch.inference_mode():
        sparse(x)
    assert calls == [1]


def test_the_vector_path_drops_dead_units_without_changing_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    first, second, last = model[1], model[3], model[5]
    with torch.no_grad():
        first.weight[0] = 0  # unit 0: no inputs, constant relu(0.7): folded into the next bias
        first.bias[0] = 0.7
        first.weight[1] = 0  # unit 1: no inputs, constant relu(-0.5) = 0: nothing to fold
        first.bias[1] = -0.5
        second.weight[:, 2] = 0  # unit 2: no outgoing weights
        second.weight[0] = 0  # second layer, unit 0: no inputs, constant relu(bias)
        last.weight[:, 4] = 0  # second layer, unit 4: unused...
        second.weight[:, 5] = 0
        second.weight[4, 5] = 1.0  # ...and first-layer unit 5 feeds only that unit: unused too
    converted = to_sparse(model, batch_size=1, kernels="dense")
    assert [tuple(weight.shape) for weight, _, _ in converted._chain] == [(2, 12), (3, 2), (3, 3)]  # units 3, 4 left
    for _ in range(5):
        x = torch.randn(1, 3, 4)
        with torch.inference_mode():
            torch.testing.assert_close(converted(x), model(x), rtol=1e-6, atol=1e-6)


class DataDependent(nn.Module):  # module level: the pickling test needs an importable class
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(20, 30), nn.Linear(30, 5)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 1e9:  # control flow on data: torch.fx cannot trace this
            h = h * 0
        return self.b(torch.relu(h))


def data_dependent_model() -> nn.Module:
    model = DataDependent().eval()
    with torch.no_grad():
        model.a.weight.mul_(torch.rand_like(model.a.weight) < 0.1)
    return model


def test_a_sparse_model_output_can_be_viewed_like_a_dense_one():
    """CSR layers hand a transposed view only to other linear layers: a result that reaches a
    ``view`` (or the caller) has F.linear's layout."""
    import torch.nn.functional as F

    class ViewsItsOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(20, 30), nn.Linear(30, 12)

        def forward(self, x):
            return self.b(F.relu(self.a(x))).view(-1)

    torch.manual_seed(0)
    model = ViewsItsOutput().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) < 0.1)
    x = torch.randn(4, 20)
    sparse = to_sparse(model, 4, kernels="sparse")
    torch.testing.assert_close(sparse(x), model(x))
    lenet = to_sparse(build_model("lenet300", (1, 28, 28), 10).eval(), 64, kernels="sparse")
    assert lenet(torch.randn(64, 1, 28, 28)).is_contiguous()


def test_untraceable_models_get_their_layers_swapped():
    model = data_dependent_model()
    converted = to_sparse(model, kernels="sparse")
    assert type(converted.graph.a).__name__ == "SparseLinear" and not converted.has_vector_path
    x = torch.randn(4, 20)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("kernels", ["sparse", "dense"])
@pytest.mark.parametrize("name", ["conv4", "resnet20"])
def test_sparse_conversion_of_conv_and_batch_norm_models_keeps_their_outputs(name, kernels):
    """Conv, batch-norm and pooling layers stay in the converted graph around the CSR Linear layers."""
    torch.manual_seed(0)
    model = build_model(name, (3, 32, 32), 10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):  # a ticket-like 90 % of zeros
                module.weight.mul_(torch.rand_like(module.weight) < 0.1)
    model.train()(torch.randn(16, 3, 32, 32))  # batch-norm statistics away from their initial values
    model.eval()
    converted = to_sparse(model, 3, kernels=kernels)
    assert set(converted.kernel_choices.values()) == {kernels}
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)

def test_conversion_is_a_copy_that_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10).train()
    converted = to_sparse(model, 2, kernels="sparse")
    assert model.training and not converted.training  # not switched behind the caller's back; the copy is eval
    def memory(module):
        return {t.data_ptr() for t in module.state_dict().values() if t.layout == torch.strided and t.numel()}

    assert not memory(model) & memory(converted)
    assert not {id(m) for m in model.modules()} & {id(m) for m in converted.modules()}
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        before = converted(x)
    model(torch.randn(8, 3, 32, 32))  # a training-mode forward updates the model's norm statistics
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), before, rtol=0, atol=0)


def test_converted_models_pickle_save_and_deep_copy(run_dir, tmp_path, monkeypatch):
    model = load_run_model(run_dir).model
    single, batch = torch.randn(1, 1, 28, 28), torch.randn(3, 1, 28, 28)
    cases = [(to_sparse(model, batch_size=1, kernels="sparse"), (single, batch)),  # vector path + fx graph
             (to_sparse(data_dependent_model(), kernels="sparse"), (torch.randn(4, 20),))]  # swapped modules
    for converted, inputs in cases:
        torch.save(converted, tmp_path / "converted.pt")
        copies = [pickle.loads(pickle.dumps(converted)), copy.deepcopy(converted),
                  torch.load(tmp_path / "converted.pt", weights_only=False)]
        for copied in copies:
            assert copied is not converted and copied.kernel_choices == converted.kernel_choices
            assert copied.state_dict().keys() == converted.state_dict().keys()  # kernels stay plain attributes
            assert copied.has_vector_path == converted.has_vector_path
            with torch.inference_mode():
                for x in inputs:
                    assert torch.equal(copied(x), converted(x))
    vector_model = cases[0][0]
    copied = copy.deepcopy(vector_model)
    originals = {t.values().data_ptr() for t in vector_model._csr_tensors()}
    assert originals and originals.isdisjoint(t.values().data_ptr() for t in copied._csr_tensors())  # deep
    with monkeypatch.context() as patch, torch.inference_mode():  # a copy enters its vector path directly too
        patch.setattr(SparseInference, "forward", lambda *args: None)
        assert torch.equal(copied(single), vector_model(single))


def test_onnx_round_trip_through_onnxruntime(run_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export_run(run_dir, "onnx", tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = load_run_model(run_dir).model
    for n in (1, 13):  # the batch axis is dynamic
        x = torch.randn(n, 1, 28, 28)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
        assert torch.equal(torch.from_numpy(got).argmax(1), want.argmax(1))


def test_a_failed_onnx_export_leaves_no_file_and_one_line(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    import onnx_ir

    def disk_full(model, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_ir, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        export_run(run_dir, "onnx", tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []

    def fails_as_torch_does(*args, **kwargs):  # the cause wrapped in an error about the export step
        try:
            raise AttributeError("module 'z3' has no attribute 'ExprRef'")
        except AttributeError as cause:
            raise RuntimeError("Failed to export the model with torch.export. "
                               "\x1b[96mThis is step 1/3\x1b[0m") from cause

    monkeypatch.setattr(torch.onnx, "export", fails_as_torch_does)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "z3").mkdir()  # e.g. a run directory named like the optional package torch.export probes
    with pytest.raises(UserError, match=r"ONNX export of lenet300 failed \(AttributeError: module 'z3' has no "
                                        r"attribute 'ExprRef'; the folder z3/ in the current directory"):
        export_run(run_dir, "onnx", tmp_path / "model.onnx")


def test_an_untraceable_model_fails_onnx_export_in_one_line_without_torchs_dumps(capfd):
    """torch.export prints graph dumps and log lines (dozens) before failing on data-dependent
    control flow: the user sees the one line saying why."""
    pytest.importorskip("onnxscript")
    from contsparse.export.formats import export_onnx
    from contsparse.export.run_model import RunModel

    class BranchesOnData(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(x) if x.sum() > 0 else -self.linear(x)

    capfd.readouterr()
    with pytest.raises(UserError, match="ONNX export of branches failed"):
        export_onnx(RunModel(BranchesOnData().eval(), "branches", (4,), 2, {}, "synthetic", None),
                    Path("unused.onnx"))
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""


def test_exports_record_how_inputs_were_preprocessed(run_dir, tmp_path):
    onnx = pytest.importorskip("onnx")
    synthetic = load_run_model(run_dir)
    run = dataclasses.replace(synthetic, dataset="mnist")  # as if trained on MNIST: the same architecture
    expected = {"pixels": "grey bytes / 255", "mean": [0.1307], "std": [0.3081], "layout": "NCHW"}
    path = tmp_path / "model.safetensors"
    path.write_bytes(_serialise(run, "safetensors"))
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["input_preprocessing"]) == expected
    compressed = tmp_path / "model.sparse.safetensors"  # the compressed format says the same
    compressed.write_bytes(_serialise(run, "compressed"))
    with safe_open(str(compressed), framework="pt") as handle:
        assert json.loads(handle.metadata()["input_preprocessing"]) == expected
        assert handle.metadata()["architecture"] == "lenet300"
    torch.testing.assert_close(load_compressed(compressed), run.model.state_dict(), rtol=0, atol=0)
    export_onnx(run, tmp_path / "model.onnx")
    properties = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(properties["input_preprocessing"]) == expected and properties["architecture"] == "lenet300"
    path.write_bytes(_serialise(synthetic, "safetensors"))  # synthetic data: nothing to record
    with safe_open(str(path), framework="pt") as handle:
        assert "input_preprocessing" not in handle.metadata()
    assert input_preprocessing("cifar10", (3, 32, 32))["std"] == [0.2470, 0.2435, 0.2616]
    assert "centre crop 224x224" in input_preprocessing("imagenet", (3, 224, 224))["resize"]


def test_cli_export_report_and_bench(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--format", "compressed", "--out", str(tmp_path / "m.sparse")]) == 0
    assert "% of the dense safetensors file" in capsys.readouterr().out
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    for name in ("per_layer.png", "first_layer_mask.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench-inference", str(run_dir), "--batch-sizes", "1", "4", "--blocks", "1"]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and printed.count("yes") == 2 and "NO" not in printed  # one row per batch size
    assert "vs inlined: sparse vs the same inlined graph with dense kernels" in " ".join(printed.split())


def test_export_replaces_a_file_of_yours_only_with_force(run_dir, tmp_path, capsys):
    """An existing --out file is kept (exit 2, one line) unless --force; the run's own export.*
    files, which export writes, are replaced without asking."""
    from safetensors.torch import load_file

    yours = tmp_path / "weights.safetensors"
    yours.write_bytes(b"a file of yours")
    assert main(["export", str(run_dir), "--out", str(yours)]) == 2
    assert capsys.readouterr().err.strip() == (f"contsparse: error: --out {yours} exists: give --force to replace it, "
                                               "or another file name")
    assert yours.read_bytes() == b"a file of yours"
    assert main(["export", str(run_dir), "--out", str(yours), "--force"]) == 0
    assert set(load_file(str(yours))) == set(load_file(str(run_dir / "model.safetensors")))
    default = run_dir / "export.safetensors"
    for out in ([], ["--out", str(default)]):  # the run's own file, by default or named
        default.write_bytes(b"an older export")
        assert main(["export", str(run_dir), *out]) == 0
        assert set(load_file(str(default))) == set(load_file(str(run_dir / "model.safetensors")))
    default.unlink()


def test_cli_export_errors_are_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text(json.dumps({"epochs": 1}))
    assert main(["export", str(tmp_path / "unfinished")]) == 2
    assert "has not finished yet" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["bench-inference", str(run_dir), "--batch-sizes", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # the run directory caught by the list of batch sizes
        main(["bench-inference", "--batch-sizes", "1", str(run_dir)])
    assert "is not a batch size (a run directory? give it before --batch-sizes)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        main(["bench-inference", str(run_dir), "--batch-sizes", "1.5"])
    assert "'1.5' is not a batch size (a whole number)" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch", "compressed"])
def test_a_failed_export_write_is_one_line_and_keeps_the_old_file(fmt, run_dir, tmp_path, capsys, monkeypatch):
    import errno
    import os

    from contsparse import storage

    target = tmp_path / "model.bin"
    target.write_bytes(b"previous export")

    def disk_full(path, data):
        path.write_bytes(data[: len(data) // 2])  # half written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage, "write_synced", disk_full)
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(target), "--force"]) == 2
    assert capsys.readouterr().err.strip() == f"contsparse: error: cannot write {target}: No space left on device"
    assert target.read_bytes() == b"previous export" and not list(tmp_path.glob("*.tmp"))
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(pipe)]) == 2
    assert "is not a regular file" in capsys.readouterr().err


def test_per_layer_chart_shows_an_emptied_layer_without_warnings(tmp_path):
    """A layer at 0 % has no bar on the log axis: the chart says so instead of warning about limits."""
    import warnings

    from contsparse.reports.plots import per_layer_chart

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = per_layer_chart({"hidden.0.weight": 0.0, "output.weight": 0.25}, tmp_path / "per_layer.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class TiedMLP(nn.Module):
    """Two hidden layers sharing one weight: the user's model with tied weights."""

    def __init__(self, input_shape, num_classes) -> None:
        super().__init__()
        self.inp = nn.Linear(int(torch.tensor(input_shape).prod()), 24)
        self.first = nn.Linear(24, 24)
        self.second = nn.Linear(24, 24)
        self.second.weight = self.first.weight
        self.out = nn.Linear(24, num_classes)

    def forward(self, x):
        hidden = torch.relu(self.inp(x.flatten(1)))
        return self.out(torch.relu(self.second(torch.relu(self.first(hidden)))))


register_model("test-tied-mlp", "two layers sharing a weight")(TiedMLP)


def test_a_model_with_tied_weights_runs_checkpoints_and_exports_with_the_tie(tmp_path):
    """safetensors refuses tensors that share memory: checkpoints, the run's files and exports
    store each key of a tied weight, and the vanilla model loads them with its tie intact."""
    settings = dict(SETTINGS, model="test-tied-mlp", epochs=2, mask_init=0.05)
    Runner(make_config(settings), tmp_path / "run", lambda _: None).execute()
    masks = load_file(str(tmp_path / "run" / "masks.safetensors"))
    assert sorted(masks) == ["first.weight", "inp.weight", "out.weight"]  # the shared weight once
    final = load_run_model(tmp_path / "run").model
    assert final.first.weight is final.second.weight
    assert torch.equal(final.first.weight != 0, masks["first.weight"].bool())
    x = torch.randn(8, 1, 28, 28)
    for fmt in ("safetensors", "compressed", "pytorch"):
        state = read_export(export_run(tmp_path / "run", fmt, tmp_path / f"model.{fmt}"), fmt)
        vanilla = TiedMLP((1, 28, 28), 10)
        vanilla.load_state_dict(state)
        assert vanilla.first.weight is vanilla.second.weight
        with torch.no_grad():
            assert torch.equal(vanilla.eval()(x), final(x))
    resumed = load_checkpoint(tmp_path / "run" / "checkpoint")["model"]
    assert torch.equal(resumed["first.weight"], resumed["second.weight"])


def sparse_linear(n_in: int, n_out: int, bias: bool = True) -> nn.Linear:
    """A Linear layer with about 90 % exact zeros (a ticket's layer)."""
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < 0.1)
    return layer


class NameClash(nn.Module):
    """Layer paths whose inlined attributes could collide: ``fc`` beside a parameter ``fc_bias``,
    ``enc.0`` beside ``enc_0``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = sparse_linear(6, 6)
        self.fc_bias = nn.Parameter(torch.randn(6))
        self.enc = nn.Sequential(sparse_linear(6, 5))
        self.enc_0 = sparse_linear(6, 4)

    def forward(self, x):
        h = self.fc(x) + self.fc_bias
        return torch.cat([self.enc(h), self.enc_0(h)], dim=1)


class InplaceResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = sparse_linear(6, 6), sparse_linear(6, 6), nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.a(x)
        return self.b(self.act(h)) + h  # h is the ReLU'd tensor here


class KeywordCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.act = sparse_linear(6, 5), nn.ReLU()

    def forward(self, x, shift):
        return self.act(input=self.a(input=x)) + shift


class Untraceable(nn.Module):
    """Data-dependent control flow (no fx trace), a Linear subclass with its own forward, attention."""

    class Tripled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 3

    def __init__(self) -> None:
        super().__init__()
        self.tripled = self.Tripled(6, 6)
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = sparse_linear(6, 3)

    def forward(self, x):
        if x.sum() > 1e9:
            x = -x
        h = self.tripled(x).unsqueeze(1)
        return self.head(self.attention(h, h, h, need_weights=False)[0].squeeze(1))


@pytest.mark.parametrize("kernels", ["dense", "sparse"])
@pytest.mark.parametrize("build", [NameClash, InplaceResidual, KeywordCalls, Untraceable])
def test_to_sparse_keeps_the_outputs_of_awkward_models(build, kernels):
    torch.manual_seed(0)
    model = build().eval()
    inputs = (torch.randn(4, 6),) + ((torch.randn(4, 5),) if build is KeywordCalls else ())
    with torch.no_grad():
        expected = model(*inputs)
        for batch in (4, 1):
            torch.testing.assert_close(to_sparse(model, batch, kernels=kernels)(*(t[:batch] for t in inputs)),
                                       expected[:batch], rtol=1e-5, atol=1e-6)


def test_to_sparse_runs_the_models_hooks_and_leaves_subclasses_and_dtypes_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), sparse_linear(6, 6), nn.ReLU(), sparse_linear(6, 3)).eval()
    x = torch.randn(2, 6)
    model[1].register_forward_hook(lambda module, args, out: out * 2)
    model[2].register_forward_hook(lambda module, args, out: out + 1)
    model.register_forward_hook(lambda module, args, out: out - 5)
    with torch.no_grad():
        for kernels in ("dense", "sparse"):
            torch.testing.assert_close(to_sparse(model, 2, kernels=kernels)(x), model(x))
    for dtype in (torch.float64, torch.bfloat16):  # "auto" times each layer in the model's dtype
        typed = nn.Sequential(sparse_linear(6, 6), nn.ReLU(), sparse_linear(6, 3)).to(dtype).eval()
        with torch.no_grad():
            torch.testing.assert_close(to_sparse(typed, 1)(x[:1].to(dtype)), typed(x[:1].to(dtype)))
    with pytest.raises(ValueError, match="kernels must be one of"):
        to_sparse(model, 1, kernels="csr")


def test_timing_inference_leaves_the_models_mode_as_it_was():
    from contsparse.export.bench import time_inference

    model = nn.Sequential(nn.Flatten(), sparse_linear(4, 3)).train()
    time_inference(model, (4,), batch_sizes=(1,), blocks=1, budget_s=0.001)
    assert model.training


def test_a_compressed_file_whose_tensors_do_not_match_its_layout_is_reported(tmp_path):
    from safetensors.torch import save

    weight = torch.zeros(8, 8)
    weight[:3, :7] = 1.0  # 21 nonzeros: a bitmask (8 bytes) is smaller than gaps (21)
    good = tmp_path / "good.safetensors"
    save_compressed({"w": weight}, good)
    stored = load_file(str(good))
    assert set(stored) == {"w.bitmask", "w.values"}
    layout = {"contsparse.compressed": json.dumps({"w": {"shape": [8, 8]}})}
    weight[:3, :7] = 0.0
    weight[0, :3] = 1.0  # 3 nonzeros: gaps (3 bytes)
    save_compressed({"w": weight}, good)
    few = load_file(str(good))
    assert set(few) == {"w.gaps", "w.values"} and torch.equal(load_compressed(good)["w"], weight)
    gaps = {"contsparse.compressed": json.dumps({"w": {"shape": [8, 8], "encoding": "gaps", "size": 64}})}
    cases = {
        "gaps: values one short": ({**few, "w.values": few["w.values"][:-1]}, gaps),
        "gaps: none": ({"w.values": few["w.values"]}, gaps),
        "gaps: floats": ({**few, "w.gaps": few["w.gaps"].float()}, gaps),
        "gaps: an escape with no end": ({**few, "w.gaps": torch.cat([few["w.gaps"], torch.tensor([255],
                                                                                               dtype=torch.uint8)])},
                                        gaps),
        "gaps: beyond the tensor": ({**few, "w.gaps": torch.tensor([0, 0, 254], dtype=torch.uint8)}, gaps),
        "gaps: another shape": (few, {"contsparse.compressed": json.dumps({"w": {"shape": [8, 9], "encoding": "gaps",
                                                                                "size": 64}})}),
        "encoding not a name": (few, {"contsparse.compressed": json.dumps({"w": {"shape": [8, 8], "encoding": None}})}),
        "values one short": ({**stored, "w.values": stored["w.values"][:-1]}, layout),
        "no bitmask": ({"w.values": stored["w.values"]}, layout),
        "float bitmask": ({**stored, "w.bitmask": stored["w.bitmask"].float()}, layout),
        "no shape": (stored, {"contsparse.compressed": json.dumps({"w": {}})}),
        "negative shape": (stored, {"contsparse.compressed": json.dumps({"w": {"shape": [-8, -8]}})}),
        "text shape": (stored, {"contsparse.compressed": json.dumps({"w": {"shape": ["a", "b"]}})}),
        "layout a list": (stored, {"contsparse.compressed": "[]"}),
        "float shape": (stored, {"contsparse.compressed": json.dumps({"w": {"shape": [8.5, 8]}})}),
        "bitmask too long": ({**stored, "w.bitmask": torch.cat([stored["w.bitmask"], stored["w.bitmask"]])}, layout),
        "bitmask 2-D": ({**stored, "w.bitmask": stored["w.bitmask"].reshape(2, -1)}, layout),
        "order of other keys": (stored, {**layout, "contsparse.order": json.dumps(["v"])}),
    }
    for name, (tensors, metadata) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(save(tensors, metadata=metadata))
        with pytest.raises(UserError, match="is damaged"):
            load_compressed(bad)
    # an encoding this version does not know is most likely a newer writer's: said so, not "damaged"
    newer = tmp_path / "newer.safetensors"
    newer.write_bytes(save(few, metadata={"contsparse.compressed": json.dumps({"w": {"shape": [8, 8],
                                                                                  "encoding": "rle"}})}))
    with pytest.raises(UserError, match=r"w is stored in the encoding 'rle'.*reads bitmask, gaps.*newer contsparse"):
        load_compressed(newer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forcing_csr_kernels_where_pytorch_has_none_is_refused_up_front(dtype):
    """No CSR product for half-precision weights on the CPU: kernels='sparse' says so when
    converting (it used to fail at the first call), and 'auto' keeps those layers dense."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 4)).to(dtype).eval()
    with torch.no_grad():
        model[1].weight[:, :6] = 0
    for batch_size in (1, 4):
        with pytest.raises(ValueError, match="no CSR product for 1's"):
            to_sparse(model, batch_size, kernels="sparse")
        converted = to_sparse(model, batch_size)
        assert converted.kernel_choices == {"1": "dense"}
        x = torch.randn(batch_size, 8, dtype=dtype)
        with torch.inference_mode():
            torch.testing.assert_close(converted(x), model(x))


def test_a_hooked_flatten_keeps_its_hook_at_batch_1():
    """The batch-1 vector path skips a plain Flatten, never a hooked one (found by a review)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    model[0].register_forward_hook(lambda module, inputs, output: output * 2)
    sparse = to_sparse(model)
    for batch in (1, 4):
        x = torch.randn(batch, 2, 3)
        torch.testing.assert_close(sparse(x), model(x))


def test_casting_a_converted_model_is_refused_not_half_done():
    sparse = to_sparse(nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval())
    with pytest.raises(RuntimeError, match=r"cast or move the model before converting it"):
        sparse.double()
    sparse.float().cpu()  # changes nothing: allowed
    assert sparse(torch.randn(1, 2, 3)).dtype == torch.float32


def test_export_writes_beside_a_baseline_but_never_over_a_runs_or_collections_files(tmp_path, capsys):
    """The nearest run folder decides what is whose: a ticket's dense/ baseline is a run of its own."""
    ticket = tmp_path / "ticket"
    assert main(["ticket", "--dataset", "synthetic", "--synthetic-size", "256", "--epochs", "2", "--rounds", "1",
                 "--ticket-epochs", "1", "--rewind-epoch", "0", "--out", str(ticket)]) == 0
    assert main(["export", str(ticket / "dense")]) == 0
    assert (ticket / "dense" / "export.safetensors").is_file()
    assert main(["export", str(ticket / "dense"), "--out", str(ticket / "model.safetensors")]) == 2
    assert "is one of the files of the run, sweep or comparison" in capsys.readouterr().err
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "compare.json").write_text("{}")
    assert main(["export", str(ticket), "--format", "pytorch", "--out", str(tmp_path / "cmp" / "compare.csv")]) == 2
    assert f"{tmp_path / 'cmp'}; writing it would damage it" in capsys.readouterr().err
    (tmp_path / "cmp" / "logs").mkdir()
    for name in (".sweep.lock", "logs/point.log", "imp-seed2/m.pt"):  # its lock, logs and a run it will make
        assert main(["export", str(ticket), "--out", str(tmp_path / "cmp" / name), "--format", "pytorch"]) == 2
        assert "writing it would damage it" in capsys.readouterr().err


# -- found by a review of the output side as a user (2026-11-27) ----------------------------


def test_compressed_stores_every_tensor_it_makes_smaller(tmp_path):
    """A tensor with 10 % zeros (an IMP round, STR) was stored whole below 50 %: a bitmask pays
    from 1/32 of zeros on."""
    from contsparse.export.compressed import save_compressed

    torch.manual_seed(0)
    some_zeros = torch.randn(64, 64)
    some_zeros[torch.rand(64, 64) < 0.1] = 0
    few_zeros = torch.randn(64, 64)
    few_zeros.view(-1)[:40] = 0  # 1 %: positions would cost more than the zeros save
    small = torch.tensor([1.0, 0.0, 2.0, 3.0])  # its second entry in the header would cost more
    state = {"some_zeros": some_zeros, "few_zeros": few_zeros, "bias": torch.randn(64), "small": small}
    save_compressed(state, tmp_path / "m.sparse.safetensors")
    stored = load_file(str(tmp_path / "m.sparse.safetensors"))
    assert {"some_zeros.values", "some_zeros.bitmask", "few_zeros", "bias", "small"} == set(stored)
    assert stored["some_zeros.values"].numel() + stored["some_zeros.bitmask"].numel() / 4 < some_zeros.numel()
    loaded = load_compressed(tmp_path / "m.sparse.safetensors")
    assert all(torch.equal(loaded[name], state[name]) for name in state)


def test_export_names_a_file_and_leaves_no_folders_after_a_failure(run_dir, tmp_path, capsys, monkeypatch):
    from contsparse import storage

    for _ in range(2):  # from Python, a file given is replaced, as torch.save would
        assert export_run(run_dir, "safetensors", tmp_path / "again.safetensors") == tmp_path / "again.safetensors"

    folder = tmp_path / "newdir"
    assert main(["export", str(run_dir), "--out", f"{folder}/"]) == 2  # a trailing slash: a folder
    assert f"--out {folder}/ names a folder; give a file name" in capsys.readouterr().err
    assert not folder.exists()

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "write_synced", disk_full)
    assert main(["export", str(run_dir), "--out", str(folder / "sub" / "m.safetensors")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not folder.exists() and tmp_path.exists()  # the folders it made, not those that were there


def test_the_first_layer_mask_picture_is_the_first_layers(run_dir, tmp_path, capsys):
    """masks.safetensors holds its names sorted (a conv model's classifier.* before features.*):
    the model's order, kept in summary.json, decides which layer is first."""
    import shutil

    assert main(["report", str(run_dir), "--out", str(tmp_path / "in-order")]) == 0
    assert "wrote " + str(tmp_path / "in-order" / "first_layer_mask.png") in capsys.readouterr().out
    reordered = tmp_path / "run"
    shutil.copytree(run_dir, reordered)
    summary = json.loads((reordered / "summary.json").read_text())
    layers = summary["per_layer"]
    summary["per_layer"] = {"hidden.1.weight": layers.pop("hidden.1.weight"), **layers}  # as if it came first
    (reordered / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(reordered), "--out", str(tmp_path / "reversed")]) == 0
    assert not (tmp_path / "reversed" / "first_layer_mask.png").exists()  # 300 inputs: no square image
    assert (tmp_path / "reversed" / "per_layer.png").is_file()


def test_to_sparse_refuses_a_model_with_soft_masks():
    """Its weights are computed at each call: every layer would run dense without a word."""
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    masks = attach_masks(model, mask_init=0.5)
    with pytest.raises(ValueError, match=r"soft CS masks attached: .* call masks\.harden\(\) or masks\.make_permanent"):
        to_sparse(model)
    masks.harden()
    assert set(to_sparse(model).kernel_choices) == {"0", "2"}


def test_a_final_model_that_does_not_fit_its_architecture_is_one_line(run_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["output.bias"]
    save_file(state, str(broken / "model.safetensors"))
    assert main(["export", str(broken), "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "does not fit the architecture its config.yaml names (lenet300): " in err and "output.bias" in err
    assert err.count("\n") == 1 and "edited by hand" not in err

"""The CS mask: formula, penalty, schedule, reset, hardening, accounting, any module."""

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import contsparse as cs
from contsparse.masking import ContinuousMask, LayerSelection, TemperatureSchedule, count_zeros


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def masked_mlp(sizes: tuple[int, int, int], temperature: float, logit_std: float = 0.3):
    """A small MLP with CS masks whose logits are spread around ``s0 = -0.1``."""
    model = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2]))
    masks = cs.attach_masks(model, mask_init=-0.1)
    with torch.no_grad():
        for p in masks.mask_parameters():
            p.normal_(0, logit_std)
    masks.temperature = temperature
    return model, masks


def test_soft_mask_formula_and_gradients_match_autograd():
    torch.manual_seed(1)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    mask = ContinuousMask(weight.shape, mask_init=-0.3, dtype=torch.float64)
    with torch.no_grad():
        mask.logits.normal_()
    mask.temperature = 3.0
    out = mask(weight)
    scale = 1 / sigmoid(-0.3)
    expected = weight * scale * torch.sigmoid(3.0 * mask.logits)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (weight, mask.logits), upstream)
    ref = torch.autograd.grad(expected, (weight, mask.logits), upstream)
    torch.testing.assert_close(grads[0], ref[0])
    torch.testing.assert_close(grads[1], ref[1])
    assert torch.autograd.gradcheck(lambda w, s: ContinuousMask.forward(mask, w), (weight, mask.logits))


@pytest.mark.parametrize("penalty", [0.0, 1e-3])
def test_batched_gradients_and_vectorized_jacobians_run_through_the_mask(penalty):
    """``is_grads_batched`` runs the hand-written backward under vmap: every op in it needs a
    batching rule (an ``out=`` op has none)."""
    torch.manual_seed(0)
    mask = ContinuousMask(torch.Size([3, 4]), mask_init=-0.05)
    mask.temperature, mask.fused_penalty = 5.0, penalty
    with torch.no_grad():
        mask.logits.normal_(0, 0.1)
    weight = torch.randn(3, 4, requires_grad=True)
    upstream = torch.randn(2, 3, 4)
    batched = torch.autograd.grad(mask(weight), (weight, mask.logits), upstream, is_grads_batched=True)
    for i in range(2):
        one = torch.autograd.grad(mask(weight), (weight, mask.logits), upstream[i])
        torch.testing.assert_close(batched[0][i], one[0])
        torch.testing.assert_close(batched[1][i], one[1])
    jacobian = torch.autograd.functional.jacobian(lambda s: mask.__class__.forward(mask, weight), mask.logits,
                                                  vectorize=True)
    assert jacobian.shape == (3, 4, 3, 4) and torch.isfinite(jacobian).all()


def test_float16_logit_gradients_do_not_overflow_where_the_true_gradient_is_small():
    """``beta * scale * g * W`` passes float16's 65504 long before ``m * (1 - m)`` shrinks it: the
    backward forms it in float32, so a pruned entry gets 0 (not inf * 0 = NaN)."""
    beta, s0 = 200.0, -3.0
    mask = ContinuousMask(torch.Size([4]), mask_init=s0, dtype=torch.float16)
    mask.temperature = beta
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([-1.0, -0.1, 0.5, -0.02]))
    weight = torch.ones(4, dtype=torch.float16, requires_grad=True)
    grad = torch.autograd.grad(mask(weight), mask.logits, torch.full((4,), 20.0, dtype=torch.float16))[0]
    m = torch.sigmoid(beta * mask.logits.double())
    expected = beta * 20.0 / sigmoid(s0) * m * (1 - m)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), expected, rtol=2e-3, atol=1e-3)


def test_initial_effective_weight_equals_weight_with_scaling():
    layer = nn.Linear(6, 3)
    before = layer.weight.detach().clone()
    cs.attach_masks(layer, mask_init=-0.7)
    torch.testing.assert_close(layer.weight, before)


def test_without_scaling_the_mask_halves_the_weight_at_s0_zero():
    layer = nn.Linear(6, 3)
    before = layer.weight.detach().clone()
    cs.attach_masks(layer, mask_init=0.0, scale_by_init=False)
    torch.testing.assert_close(layer.weight, before * 0.5)



@pytest.mark.parametrize("scale_by_init", [True, False])
def test_hardening_folds_the_scale_only_when_scaling(scale_by_init):
    """Both settings of DESIGN.md's mask scaling: the ticket's weights are ``W * H(s)``, times
    ``1 / sigmoid(s0)`` only with scaling, and train as a plain layer afterwards."""
    torch.manual_seed(2)
    layer = nn.Linear(6, 4)
    raw = layer.weight.detach().clone()
    masks = cs.attach_masks(layer, mask_init=-0.3, scale_by_init=scale_by_init)
    with torch.no_grad():
        masks.mask_parameters()[0].normal_()
    keep = masks.mask_parameters()[0].detach() > 0
    masks.harden()
    scale = 1.0 + math.exp(0.3) if scale_by_init else 1.0
    torch.testing.assert_close(layer.weight.detach(), raw * keep * scale)
    assert isinstance(layer.weight, nn.Parameter)  # a plain layer again

def test_penalty_value_and_gradient_by_hand():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    masks = cs.attach_masks(model, mask_init=0.0)
    masks.temperature = 2.0
    logits = masks.mask_parameters()
    with torch.no_grad():
        logits[0].fill_(0.5)
        logits[1].fill_(-1.0)
    penalty = masks.penalty()
    expected = 6 * sigmoid(1.0) + 4 * sigmoid(-2.0)
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    m0 = sigmoid(1.0)
    assert logits[0].grad[0, 0].item() == pytest.approx(2.0 * m0 * (1 - m0), rel=1e-5)
    assert masks.penalty(normalize=True).item() == pytest.approx(expected / 10, rel=1e-6)


def test_penalty_reuses_the_forward_mask_and_notices_changes():
    layer = nn.Linear(4, 4)
    masks = cs.attach_masks(layer, mask_init=0.0)
    layer(torch.randn(2, 4)).sum().backward()
    first = masks.penalty().item()
    with torch.no_grad():
        masks.mask_parameters()[0].add_(1.0)  # a step: the cached mask is stale now
    assert masks.penalty().item() == pytest.approx(16 * sigmoid(1.0), rel=1e-6)
    assert first == pytest.approx(16 * 0.5)


@pytest.mark.parametrize("penalty_first", [False, True])
def test_penalty_after_a_fused_optimiser_step_is_current(penalty_first):
    """Fused optimisers change the logits without bumping their version: the mask cached by the
    forward pass must not survive into the next step's penalty (value or gradient)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    masks = cs.attach_masks(layer, mask_init=0.0)
    optimizer = torch.optim.SGD(masks.mask_parameters(), lr=10.0, fused=True)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    for _ in range(2):
        optimizer.zero_grad()
        if penalty_first:  # the penalty term written before the forward pass
            penalty = masks.penalty()
            loss = penalty + F.cross_entropy(layer(x), y)
        else:
            loss = F.cross_entropy(layer(x), y) + masks.penalty()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad()
    logits = masks.mask_parameters()[0]
    expected = torch.sigmoid(logits.detach()).sum()
    penalty = masks.penalty()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    penalty.backward()
    assert torch.allclose(logits.grad, (torch.sigmoid(logits) * (1 - torch.sigmoid(logits))).detach())



@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_penalised_loss_gradients_match_a_plain_autograd_reference(fused, normalize):
    """Weight and logit gradients of ``CE(W * scale * sigmoid(beta s)) + c * penalty`` against the
    formula written with autograd, the penalty added as a loss term or fused into the backward."""
    torch.manual_seed(5)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    model, masks = masked_mlp((5, 7, 3), temperature=6.0)
    model.double()
    coef = 0.05
    if fused:
        masks.fuse_penalty(coef, normalize=normalize)
        loss = F.cross_entropy(model(x), y)
    else:
        loss = F.cross_entropy(model(x), y) + coef * masks.penalty(normalize=normalize)
    loss.backward()

    raw = [model[i].parametrizations.weight.original.detach().clone().requires_grad_() for i in (0, 2)]
    logits = [p.detach().clone().requires_grad_() for p in masks.mask_parameters()]
    scale = 1.0 + math.exp(0.1)  # 1 / sigmoid(s0), s0 = -0.1
    soft = [torch.sigmoid(6.0 * s) for s in logits]
    hidden = F.relu(F.linear(x, raw[0] * scale * soft[0], model[0].bias.detach()))
    reference_penalty = sum(m.sum() for m in soft) / (sum(m.numel() for m in soft) if normalize else 1)
    reference = F.cross_entropy(F.linear(hidden, raw[1] * scale * soft[1], model[2].bias.detach()), y) \
        + coef * reference_penalty
    reference.backward()

    for ours, theirs in zip(masks.mask_parameters(), logits, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad)
    for i, theirs in zip((0, 2), raw, strict=True):
        torch.testing.assert_close(model[i].parametrizations.weight.original.grad, theirs.grad)
    assert max(float(s.grad.abs().max()) for s in logits) > 1e-3  # the gradients compared are not all zero


def test_soft_masked_weight_without_autograd_is_the_formula():
    """Validation during a search runs under ``no_grad``, which takes a separate code path."""
    torch.manual_seed(6)
    model, masks = masked_mlp((5, 7, 3), temperature=9.0)
    mask = masks.masks["0.weight"]
    raw = model[0].parametrizations.weight.original
    expected = raw.detach() * mask.scale * torch.sigmoid(9.0 * mask.logits.detach())
    with torch.no_grad():
        torch.testing.assert_close(model[0].weight, expected)
    with torch.enable_grad():
        torch.testing.assert_close(model[0].weight.detach(), expected)

@pytest.mark.parametrize("siamese", [False, True])
def test_fused_penalty_gives_the_same_logit_gradient(siamese):
    """Fused or as a loss term, the same gradient; also for a siamese step (two inputs through the
    model, one loss), where the fused penalty must still be added once."""
    torch.manual_seed(3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    other = torch.randn(8, 5)
    grads = []
    for fused in (False, True):
        torch.manual_seed(4)
        model, masks = masked_mlp((5, 7, 3), temperature=4.0)
        if fused:
            masks.fuse_penalty(0.05)  # before the forward pass that it applies to
        loss = (model(x) - model(other)).pow(2).mean() if siamese else F.cross_entropy(model(x), y)
        if not fused:
            loss = loss + 0.05 * masks.penalty()
        loss.backward()
        grads.append([p.grad.clone() for p in masks.mask_parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_temperature_schedule_by_hand():
    schedule = TemperatureSchedule(final=200.0, epochs=5)
    values = [schedule.value(e) for e in range(5)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(200.0)
    for a, b in itertools.pairwise(values):
        assert b / a == pytest.approx(200 ** (1 / 4))
    per_step = TemperatureSchedule(final=100.0, epochs=2, per="step", steps_per_epoch=3)
    assert per_step.value(0, 0) == 1.0
    assert per_step.value(1, 2) == pytest.approx(100.0)
    assert per_step.value(1, 0) == pytest.approx(100 ** (3 / 5))
    one_epoch = TemperatureSchedule(final=100.0, epochs=1, steps_per_epoch=5)  # anneals over its steps
    assert [one_epoch.value(0, s) for s in (0, 2, 4)] == pytest.approx([1.0, 10.0, 100.0])
    assert TemperatureSchedule(final=100.0, epochs=1).value(0) == 1.0  # one step: the round's start
    with pytest.raises(ValueError):
        TemperatureSchedule(final=1.0)


@pytest.mark.parametrize("settings", [dict(per="Step"), dict(final=float("inf")), dict(epochs=2.5),
                                      dict(steps_per_epoch=0), dict(final="200")])
def test_temperature_schedule_refuses_bad_settings(settings):
    with pytest.raises(ValueError):
        TemperatureSchedule(**settings)


def test_temperature_schedule_takes_numpy_numbers():
    np = pytest.importorskip("numpy")
    assert TemperatureSchedule(final=np.float32(200.0), epochs=np.int64(5)).value(4) == pytest.approx(200.0)
    small = TemperatureSchedule(final=200.0, epochs=np.int16(200), per="step", steps_per_epoch=np.int16(200))
    assert small.value(100, 0) == pytest.approx(200 ** (20000 / 39999))  # no int16 overflow


def test_annealing_over_steps_refuses_a_step_beyond_its_epoch():
    """Without steps_per_epoch, step 9 would read as a later epoch: beta would reach its final
    value in the first epoch and fall back in the second."""
    schedule = TemperatureSchedule(final=200.0, epochs=10, per="step")  # steps_per_epoch left at 1
    with pytest.raises(ValueError, match="steps_per_epoch=len"):
        schedule.value(0, 9)
    assert schedule.value(0, 1) == schedule.value(1, 0)  # the epoch's end is the next one's start
    with pytest.raises(ValueError, match="steps_per_epoch=len"):
        TemperatureSchedule(final=200.0, epochs=1).value(0, 99)  # a one-epoch round anneals over steps


def test_reset_rule_min_of_beta_s_and_s0():
    layer = nn.Linear(2, 2)
    masks = cs.attach_masks(layer, mask_init=0.2)
    logits = masks.mask_parameters()[0]
    with torch.no_grad():
        logits.copy_(torch.tensor([[0.5, -0.01], [0.001, -2.0]]))
    masks.temperature = 100.0
    masks.reset_logits()
    expected = torch.tensor([[0.2, -1.0], [0.1, -200.0]])
    torch.testing.assert_close(logits.detach(), expected)
    assert masks.temperature == 1.0


def test_hard_mask_accounting_equals_counted_zeros_and_zeros_survive_any_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    masks = cs.attach_masks(model, mask_init=0.0)
    with torch.no_grad():
        for p in masks.mask_parameters():
            p.uniform_(-1, 0.3)
    expected = masks.weights_remaining()
    masks.harden()
    weights = masks.masked_weights()
    zeros, total = count_zeros(weights)
    assert 1 - zeros / total == pytest.approx(expected)
    for optimizer in (torch.optim.SGD(masks.weight_parameters(), lr=0.5, momentum=0.9, weight_decay=0.1),
                      torch.optim.Adam(masks.weight_parameters(), lr=0.1, weight_decay=0.1)):
        # momentum state that is non-zero at pruned positions must not leak into them
        masks.keep_pruned_at_zero(optimizer)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 20)).pow(2).sum().backward()
            for w in weights.values():
                w.grad.add_(1.0)  # gradient at pruned positions too
            optimizer.step()
        zeros_after, _ = count_zeros(weights)
        assert zeros_after >= zeros
        for name, keep in masks.binary_masks().items():
            assert torch.all(weights[name][~keep] == 0)


def test_hardening_folds_scale_and_mask_into_the_weight():
    layer = nn.Linear(4, 3)
    masks = cs.attach_masks(layer, mask_init=-0.2)
    raw = masks.masked_weights()["weight"].detach().clone()
    logits = masks.mask_parameters()[0]
    with torch.no_grad():
        logits.copy_(torch.randn_like(logits))
    keep = logits.detach() > 0
    masks.harden()
    torch.testing.assert_close(layer.weight, raw * keep / sigmoid(-0.2))


def test_linear_conv_and_nested_user_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.inner(torch.relu(self.conv(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.head(self.block(x).flatten(1))

    net = Net()
    x = torch.randn(2, 3, 8, 8)
    net.eval()
    before = net(x)
    masks = cs.attach_masks(net, mask_init=0.0)
    assert sorted(masks.masks) == ["block.conv.weight", "block.inner.0.weight", "head.weight"]
    torch.testing.assert_close(net(x), before)  # scaled mask at s0 is the identity
    net.train()
    net(x).sum().backward()
    assert all(p.grad is not None for p in masks.mask_parameters())
    assert masks.num_prunable() == 3 * 4 * 9 + 16 + 2560


def test_selection_rules():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    assert LayerSelection(exclude_first=True, exclude_last=True).select(model) == ["1"]
    assert LayerSelection(include=[r"^[02]$"]).select(model) == ["0", "2"]
    assert LayerSelection(exclude=["1"]).select(model) == ["0", "2"]
    with pytest.raises(ValueError, match="no layer"):
        cs.attach_masks(model, selection=LayerSelection(include=["nothing"]))
    assert LayerSelection(include="^2").select(model) == ["2"]  # a lone pattern, not its characters
    assert LayerSelection(exclude="1", layer_types=nn.Linear).select(model) == ["0", "2"]
    with pytest.raises(ValueError, match="not a regular expression"):
        LayerSelection(include=["(unclosed"])
    masks = cs.attach_masks(model)
    with pytest.raises(ValueError, match="already has a CS mask"):
        cs.attach_masks(model)
    masks.harden()
    with pytest.raises(ValueError, match="make_permanent"):
        cs.attach_masks(model)
    masks.make_permanent()
    assert len(cs.attach_masks(model)) == 3


def test_layers_a_mask_cannot_take_are_reported_not_skipped():
    import torch.nn.utils.prune as prune

    pruned = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    prune.l1_unstructured(pruned[0], "weight", 0.5)
    with pytest.raises(ValueError, match=r"0\.weight is not a parameter.*prune\.remove"):
        cs.attach_masks(pruned)
    normed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    nn.utils.parametrizations.weight_norm(normed[1])
    with pytest.raises(ValueError, match=r"1.weight already has a parametrization \(_WeightNorm\)"):
        cs.attach_masks(normed)
    embeddings = LayerSelection(layer_types=(nn.Embedding,))
    for options in ({"sparse": True}, {"max_norm": 1.0}):
        with pytest.raises(ValueError, match="sparse=True or max_norm"):
            cs.attach_masks(nn.Embedding(5, 3, **options), selection=embeddings)
    with pytest.raises(ValueError, match="mask_init >= -30"):
        cs.attach_masks(nn.Linear(2, 2), mask_init=-100.0)
    cs.attach_masks(nn.Linear(2, 2), mask_init=-100.0, scale_by_init=False)  # no scale, no overflow


def test_keeping_pruned_weights_at_zero_works_when_set_up_before_hardening():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))
    masks = cs.attach_masks(model, mask_init=0.0)
    with torch.no_grad():
        for s in masks.mask_parameters():
            s.normal_()
    opt = torch.optim.Adam(masks.weight_parameters(), lr=0.1)
    masks.keep_pruned_at_zero(opt)  # registered at the start of training, in soft mode
    masks.zero_pruned()  # and called once in soft mode: nothing to do yet
    masks.harden()
    pruned = {name: ~mask for name, mask in masks.binary_masks().items()}
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
    weights = masks.masked_weights()
    assert all(int(mask.sum()) > 0 and torch.all(weights[name][mask] == 0) for name, mask in pruned.items())


def test_loading_binary_masks_checks_everything_before_changing_anything():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    masks = cs.attach_masks(model, mask_init=-0.05)
    before = [s.detach().clone() for s in masks.mask_parameters()]
    wrong_shape = {"0.weight": torch.ones(4, 4, dtype=torch.bool), "1.weight": torch.ones(4, 2, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"1.weight \(4, 2\) != \(2, 4\)"):
        masks.load_binary_masks(wrong_shape)
    with pytest.raises(KeyError, match=r"no layer.*typo"):
        masks.load_binary_masks({**masks.binary_masks(), "typo.weight": torch.ones(1)})
    logits = {name: mask.logits.detach().clone().normal_() for name, mask in masks}  # not a binary mask:
    with pytest.raises(ValueError, match="boolean or hold only 0 and 1"):  # every nonzero would be kept
        masks.load_binary_masks(logits)
    with pytest.raises(TypeError, match="dict"):
        masks.load_binary_masks(list(logits.values()))
    assert all(torch.equal(s, b) for s, b in zip(masks.mask_parameters(), before, strict=True))
    assert masks.mode == "soft"


def test_state_dict_round_trip_soft_and_hard():
    def make():
        model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
        return model, cs.attach_masks(model, mask_init=-0.1)

    model, masks = make()
    with torch.no_grad():
        for p in masks.mask_parameters():
            p.normal_()
    masks.temperature = 7.0
    x = torch.randn(3, 5)
    for hard in (False, True):
        if hard:
            masks.harden()
        clone, clone_masks = make()
        if hard:
            clone_masks.harden()  # a hardened state_dict loads into a hardened model
            assert not any("parametrizations" in k for k in model.state_dict())
        clone.load_state_dict(model.state_dict())
        assert clone_masks.temperature == 7.0 and clone_masks.mode == masks.mode
        torch.testing.assert_close(clone(x), model(x))
        assert clone_masks.weights_remaining() == masks.weights_remaining()


def test_make_permanent_leaves_a_plain_module_with_the_same_outputs():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = cs.attach_masks(model, mask_init=0.0)
    with torch.no_grad():
        for p in masks.mask_parameters():
            p.normal_()
    masks.harden()
    x = torch.randn(3, 5)
    expected = model(x)
    remaining = masks.weights_remaining()
    plain = masks.make_permanent()
    assert set(plain.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(plain(x), expected)
    zeros, total = count_zeros({"a": plain[0].weight, "b": plain[2].weight})
    assert 1 - zeros / total == pytest.approx(remaining)
    fresh = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    fresh.load_state_dict(plain.state_dict())
    torch.testing.assert_close(fresh(x), expected)
    # The emptied MaskSet refuses to act: it would report a dense model and stop re-zeroing
    for action in (masks.weights_remaining, masks.per_layer_remaining, masks.zero_pruned, masks.penalty,
                   masks.harden, masks.reset_logits):
        with pytest.raises(RuntimeError, match="made permanent"):
            action()
    assert masks.make_permanent() is plain and "made permanent" in repr(masks)


def test_attach_masks_explains_wrong_arguments_and_empty_selections():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with pytest.raises(TypeError, match="selection must be a LayerSelection"):
        cs.attach_masks(model, selection={"include": ["0"]})
    with pytest.raises(TypeError, match="selection="):
        cs.attach_masks(model, LayerSelection())
    with pytest.raises(TypeError, match=r"nn\.Module"):
        cs.attach_masks(lambda x: x)
    with pytest.raises(TypeError, match="scale_by_init"):
        cs.attach_masks(model, scale_by_init="no")
    with pytest.raises(ValueError, match=r"named weights; the model has Linear \(bias, weight\)"):
        cs.attach_masks(model, selection=LayerSelection(parameters="weights"))
    with pytest.raises(ValueError, match=r"the model has Bilinear"):
        cs.attach_masks(nn.Sequential(nn.Bilinear(2, 2, 1)))
    with pytest.raises(ValueError, match="exclude_first left out every one"):
        cs.attach_masks(nn.Sequential(nn.Linear(2, 2)), selection=LayerSelection(exclude_first=True))
    assert LayerSelection(include=None, exclude=None).select(model) == ["0", "1"]
    masks = cs.attach_masks(model)
    for coef in (float("nan"), -1.0, True):
        with pytest.raises(ValueError, match="finite number >= 0"):
            masks.fuse_penalty(coef)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_soft_and_hard_masks_match_cpu():
    torch.manual_seed(5)
    model, masks = masked_mlp((6, 5, 3), temperature=3.0)
    masks.fuse_penalty(0.01)
    x = torch.randn(4, 6)
    # a separate model, not a deepcopy: copies of a parametrized module share its class
    gpu_model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    gpu_masks = cs.attach_masks(gpu_model, mask_init=-0.1)
    gpu_model.load_state_dict(model.state_dict())
    gpu_model.cuda()
    gpu_masks.fuse_penalty(0.01)
    model(x).sum().backward()
    gpu_model(x.cuda()).sum().backward()
    for a, b in zip(masks.mask_parameters(), gpu_masks.mask_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad.cpu())
    masks.harden()
    gpu_masks.harden()
    torch.testing.assert_close(model(x), gpu_model(x.cuda()).cpu())
    assert gpu_masks.weights_remaining() == masks.weights_remaining()


def test_loading_saved_binary_masks_gives_a_plain_hardened_model():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    masks = cs.attach_masks(model, mask_init=0.0)
    raw = {k: w.detach().clone() for k, w in masks.masked_weights().items()}
    saved = {"0.weight": torch.rand(3, 4) < 0.5, "2.weight": torch.rand(2, 3) < 0.5}
    masks.load_binary_masks(saved)
    assert masks.mode == "hard" and not any("parametrizations" in k for k in model.state_dict())
    torch.testing.assert_close(model[0].weight, raw["0.weight"] * saved["0.weight"] * 2.0)
    assert masks.binary_masks()["2.weight"].equal(saved["2.weight"])


def test_binary_masks_reapplied_to_trained_weights_without_the_scale():
    """Masks saved with binary_masks() and a state_dict saved after make_permanent() rebuild the
    same network with scale=False (the weights carry the scale already)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    masks = cs.attach_masks(model, mask_init=-0.05)
    with torch.no_grad():
        for logits in masks.mask_parameters():
            logits.normal_()
    masks.harden()
    saved_masks, saved_state = masks.binary_masks(), masks.make_permanent().state_dict()
    x = torch.randn(5, 4)
    again = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    again.load_state_dict(saved_state)
    cs.attach_masks(again, mask_init=-0.05).load_binary_masks(saved_masks, scale=False)
    assert torch.equal(again(x), model(x))
    with pytest.raises(TypeError, match="True or False"):
        cs.attach_masks(nn.Linear(2, 2)).load_binary_masks({"weight": torch.ones(2, 2)}, scale="no")


def test_rewind_point_restores_weights_and_norm_statistics_in_either_mode():
    """rewind_point() / rewind(): the lottery-ticket rewind in a user's own loop. A point taken in
    soft mode and loaded after harden() gives scale * H(s) * W_k exactly, and the norm statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    masks = cs.attach_masks(model, mask_init=-0.05)
    point = masks.rewind_point()
    assert sorted(point) == ["0.bias", "0.weight", "1.bias", "1.num_batches_tracked", "1.running_mean",
                             "1.running_var", "1.weight", "3.bias", "3.weight"]
    weight_opt = torch.optim.SGD(masks.weight_parameters(), lr=0.1)
    mask_opt = torch.optim.SGD(masks.mask_parameters(), lr=0.5)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for step in range(10):
        masks.temperature = 1.0 + step
        loss = F.cross_entropy(model(x), y)
        weight_opt.zero_grad()
        mask_opt.zero_grad()
        loss.backward()
        weight_opt.step()
        mask_opt.step()
    assert not torch.equal(model[1].running_mean, point["1.running_mean"])
    masks.harden()
    masks.rewind(point)
    for name in ("0.weight", "3.weight"):
        mask = masks.masks[name]
        assert torch.equal(masks.masked_weights()[name], point[name] * mask.hard_mask * mask.scale)
    assert torch.equal(model[1].running_mean, point["1.running_mean"]) and torch.equal(model[0].bias, point["0.bias"])
    hard_point = masks.rewind_point()  # taken in hard mode: the unscaled weights
    torch.testing.assert_close(hard_point["0.weight"], point["0.weight"] * masks.masks["0.weight"].hard_mask)
    with pytest.raises(KeyError, match=r"no value for 0\.bias, 0\.weight, 1\.bias"):
        masks.rewind({})
    with pytest.raises(ValueError, match="shapes do not fit"):
        masks.rewind({**point, "0.weight": torch.zeros(2, 2)})


def test_hardening_warns_when_a_layer_keeps_nothing():
    """A layer with no weight left cuts the network in two; when the logits got gradients but
    never moved, the likely cause (an optimiser made before attach_masks) is named. Masks just
    attached and hardened to load a hardened state_dict into them are not warned about."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters())  # before attach_masks: the logits are not in it
    masks = cs.attach_masks(model, mask_init=-0.05)
    model(torch.randn(3, 5)).sum().add(masks.penalty()).backward()
    optimizer.step()
    with pytest.warns(UserWarning, match=r"2 of 2 layers \(0.weight, 2.weight\) keep no weight at all .*optimiser"):
        masks.harden()
    fresh = cs.attach_masks(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)), mask_init=-0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.harden()
    trained = cs.attach_masks(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)), mask_init=0.5)
    with torch.no_grad():
        trained.masks["2.weight"].logits.fill_(-1.0)
    with pytest.warns(UserWarning, match=r"2.weight keeps no weight at all \(every logit <= 0\)$"):
        trained.harden()
    quiet = cs.attach_masks(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)), mask_init=0.5)
    with torch.no_grad():
        quiet.masks["2.weight"].logits.fill_(-1.0)
    with warnings.catch_warnings():  # a caller that reports empty layers itself (the CLI's runs)
        warnings.simplefilter("error")
        quiet.harden(warn_empty=False)
    assert not quiet.binary_masks()["2.weight"].any() and quiet.binary_masks()["0.weight"].all()


def test_keep_pruned_at_zero_ends_with_make_permanent():
    model = nn.Linear(4, 3)
    masks = cs.attach_masks(model, mask_init=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    with torch.no_grad():
        masks.masks["weight"].logits[0].fill_(-1.0)  # the first output's weights pruned
    masks.harden()
    masks.keep_pruned_at_zero(optimizer)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert not model.weight[0].any()  # re-zeroed after the step
    plain = masks.make_permanent()
    assert not optimizer._optimizer_step_post_hooks  # the hook ended with the masks
    optimizer.zero_grad()
    plain(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # fine-tuning goes on with the plain model, whose zeros are now its own to change
    assert model.weight[0].all()


def test_weights_remaining_of_all_layers_counts_unmasked_ones_as_kept():
    from contsparse.masking.accounting import weights_remaining_all_layers

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4))
    masks = cs.attach_masks(model, mask_init=-1.0, selection=LayerSelection(include=["^0$"]))
    assert masks.weights_remaining() == 0.0
    assert weights_remaining_all_layers(model, masks.binary_masks()) == 0.5  # 0 of 16 masked, 16 of 16 unmasked
    masks.harden()
    assert weights_remaining_all_layers(model, masks.binary_masks()) == 0.5
    assert weights_remaining_all_layers(nn.Sequential(nn.ReLU()), {}) == 1.0


def test_transposed_convolutions_are_masked_by_default():
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.Conv2d(4, 2, 1), nn.ConvTranspose1d(2, 2, 2))
    assert sorted(cs.attach_masks(model).masks) == ["0.weight", "1.weight", "2.weight"]


def test_masks_on_a_channels_last_model_keep_its_layout_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    model.to(memory_format=torch.channels_last)
    masks = cs.attach_masks(model, mask_init=0.5)
    for logits in masks.mask_parameters():
        assert logits.is_contiguous(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_torch_compile_gives_eager_gradients_and_does_not_recompile_for_a_new_temperature():
    """Compiled models take the traceable mask: same gradients (fused penalty included) as eager,
    one graph for every temperature (it is read from a tensor), the same penalty."""
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward  # no code generation: this is about tracing, and fast

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    masks = cs.attach_masks(model, mask_init=-0.05)
    masks.fuse_penalty(1e-2)
    compiled = torch.compile(model, backend=counting_backend)
    x, y = torch.randn(16, 3, 4), torch.randint(0, 3, (16,))
    for beta in (1.0, 2.5, 40.0):
        masks.temperature = beta
        grads = []
        for forward in (compiled, model):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(forward(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for compiled_grad, eager_grad in zip(*grads, strict=True):
            torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)
    assert len(compiles) == 1
    penalty = torch.compile(masks.penalty, backend=counting_backend)
    torch.testing.assert_close(penalty(), masks.penalty())


def test_the_temperature_tensor_keeps_full_precision_and_old_pickles_load():
    mask = ContinuousMask(torch.Size([3, 4]), mask_init=-0.05)
    mask.temperature = 137.35
    mask.half()  # the logits go to float16, the temperature tensor stays float32
    assert mask._temperature_tensor.dtype == torch.float32
    assert mask._temperature_tensor.item() == pytest.approx(137.35, rel=1e-7)
    mask.double()
    assert mask._temperature_tensor.dtype == torch.float64 and mask._temperature_tensor.item() == 137.35
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    masks = cs.attach_masks(model)
    masks.temperature = 12.5  # one update for all masks
    assert [m.temperature for _, m in masks] == [12.5, 12.5]
    assert [m._temperature_tensor.item() for _, m in masks] == [12.5, 12.5]
    # a whole-module pickle written before the temperature tensor existed
    state = dict(ContinuousMask(torch.Size([2, 2])).__dict__)
    state["temperature"] = state.pop("_temperature") * 7
    for newer in ("uses", "attached_as", "_penalty_due"):  # attributes added since
        del state[newer]
    state["_buffers"] = {k: v for k, v in state["_buffers"].items() if k != "_temperature_tensor"}
    old = ContinuousMask.__new__(ContinuousMask)
    old.__setstate__(state)
    assert old.temperature == 7.0 and old._temperature_tensor.item() == 7.0
    assert (old.uses, old.attached_as, old._penalty_due.item()) == (1, None, False)
    assert "_temperature_tensor" not in old.state_dict()


class TiedLanguageModel(nn.Module):
    """Embedding and output layer share one weight (as in GPT-2); a Linear is applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        hidden = self.embed(tokens)
        hidden = self.mix(torch.tanh(self.mix(hidden)))  # the same layer twice
        return self.head(hidden)


def tied_model_with_masks(seed: int = 0, beta: float = 3.0):
    torch.manual_seed(seed)
    model = TiedLanguageModel().double()
    masks = cs.attach_masks(model, mask_init=-0.2)
    with torch.no_grad():
        for s in masks.mask_parameters():
            s.normal_(0, 0.4)
    masks.temperature = beta
    return model, masks


def test_a_tied_weight_gets_one_mask_that_every_use_sees():
    model, masks = tied_model_with_masks()
    assert list(masks.masks) == ["mix.weight", "head.weight"] and masks.tied["head.weight"] == ["embed.weight"]
    assert masks.num_prunable() == 36 + 66  # the shared weight counted once
    mask = masks.masks["head.weight"]
    raw = model.head.parametrizations.weight.original
    assert raw is model.embed.parametrizations.weight.original
    expected = raw.detach() * mask.scale * torch.sigmoid(3.0 * mask.logits.detach())
    torch.testing.assert_close(model.embed.weight, expected)
    torch.testing.assert_close(model.head.weight, expected)
    found = cs.find_masks(model)
    assert list(found.masks) == ["mix.weight", "head.weight"] and found.tied == masks.tied
    assert found.masks["head.weight"] is mask


def test_a_tie_that_overrides_an_exclusion_warns():
    """The tie wins (one tensor, one mask); excluding one of its places says so. A place whose type
    the selection does not take (the embedding of a tied language-model head) is the documented case."""
    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.mix, self.decoder = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.decoder.weight = self.encoder.weight

        def forward(self, x):
            return self.decoder(self.mix(self.encoder(x)))

    with pytest.warns(UserWarning, match="decoder.weight is tied to encoder.weight, so it gets its mask"):
        masks = cs.attach_masks(TiedHead(), selection=LayerSelection(exclude=["decoder"]))
    assert masks.tied["encoder.weight"] == ["decoder.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tied_model_with_masks()  # Linear head tied to an Embedding the selection does not take: no warning


@pytest.mark.parametrize("fused", [False, True])
def test_tied_and_reused_weights_get_plain_autograd_gradients_with_the_penalty_once(fused):
    """The shared weight is used by the embedding and the head, ``mix`` twice per forward: the
    fused penalty must still be counted once per step, as a loss term would be."""
    model, masks = tied_model_with_masks(seed=1)
    tokens, targets = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5))
    coef = 0.03
    if fused:
        masks.fuse_penalty(coef)
    loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    if not fused:
        loss = loss + coef * masks.penalty()
    loss.backward()

    w_tied = model.head.parametrizations.weight.original.detach().clone().requires_grad_()
    w_mix = model.mix.parametrizations.weight.original.detach().clone().requires_grad_()
    s_mix, s_tied = (s.detach().clone().requires_grad_() for s in masks.mask_parameters())
    scale = 1 / sigmoid(-0.2)
    soft_mix, soft_tied = torch.sigmoid(3.0 * s_mix), torch.sigmoid(3.0 * s_tied)
    tied, mix = w_tied * scale * soft_tied, w_mix * scale * soft_mix
    hidden = F.embedding(tokens, tied)
    hidden = F.linear(torch.tanh(F.linear(hidden, mix, model.mix.bias.detach())), mix, model.mix.bias.detach())
    reference = F.cross_entropy(F.linear(hidden, tied).flatten(0, 1), targets.flatten()) \
        + coef * (soft_mix.sum() + soft_tied.sum())
    reference.backward()
    ours = masks.mask_parameters()
    torch.testing.assert_close(ours[0].grad, s_mix.grad)
    torch.testing.assert_close(ours[1].grad, s_tied.grad)
    torch.testing.assert_close(model.head.parametrizations.weight.original.grad, w_tied.grad)
    torch.testing.assert_close(model.mix.parametrizations.weight.original.grad, w_mix.grad)


def test_hardening_a_tied_weight_folds_its_mask_once_and_keeps_the_tie():
    model, masks = tied_model_with_masks(seed=2)
    mask = masks.masks["head.weight"]
    raw = model.head.parametrizations.weight.original.detach().clone()
    expected = raw * mask.scale * (mask.logits.detach() > 0)
    tokens = torch.randint(0, 11, (3, 4))
    masks.harden()
    assert model.head.weight is model.embed.weight  # still one Parameter
    torch.testing.assert_close(model.head.weight.detach(), expected)  # scale applied once
    assert model.embed.weight_cs_mask is mask and model.head.weight_cs_mask is mask
    # accounting works on the hardened set: the nonzeros of the masked weights, the tied one counted once
    weights = list(masks.masked_weights().values())
    assert len(weights) == len(masks.masks)
    assert masks.weights_remaining() == pytest.approx(sum(int((w != 0).sum()) for w in weights)
                                                      / sum(w.numel() for w in weights))
    hard_out = model(tokens)

    fresh, fresh_masks = tied_model_with_masks(seed=3)
    fresh_masks.harden()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(tokens), hard_out)
    assert list(cs.find_masks(fresh).masks) == ["mix.weight", "head.weight"]

    plain = masks.make_permanent()
    assert plain.head.weight is plain.embed.weight
    assert not any("cs_mask" in key or "parametrizations" in key for key in plain.state_dict())
    torch.testing.assert_close(plain(tokens), hard_out)


def test_two_selected_layers_sharing_a_weight_get_one_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    masks = cs.attach_masks(model, mask_init=0.3)
    assert list(masks.masks) == ["0.weight"] and masks.tied == {"0.weight": ["2.weight"]}
    masks.harden()
    mask = masks.masks["0.weight"]
    assert torch.equal(model[0].weight != 0, mask.hard_mask > 0)
    assert model[0].weight is model[2].weight


def test_compiled_fused_penalty_is_shared_among_the_uses_of_a_tied_weight():
    model, masks = tied_model_with_masks(seed=4)
    masks.fuse_penalty(0.05)
    tokens, targets = torch.randint(0, 11, (2, 3)), torch.randint(0, 11, (2, 3))
    grads = []
    for forward in (torch.compile(model, backend="aot_eager"), model):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(forward(tokens).flatten(0, 1), targets.flatten()).backward()
        grads.append(masks.masks["head.weight"].logits.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


class Recurrent(nn.Module):
    """Attention and an LSTM: their main weights are not called ``weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.lstm = nn.LSTM(6, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        mixed, _ = self.attention(x, x, x)
        return self.head(self.lstm(mixed)[0][:, -1])


def test_lstm_and_attention_weights_are_masked_when_selected():
    torch.manual_seed(0)
    selection = LayerSelection(layer_types=(nn.Linear, nn.MultiheadAttention, nn.LSTM),
                               parameters=("weight", "in_proj_weight", r"weight_(ih|hh)_l\d+"))
    model = Recurrent()
    plain = Recurrent()
    plain.load_state_dict(model.state_dict())
    masks = cs.attach_masks(model, mask_init=0.4, selection=selection)
    assert list(masks.masks) == ["attention.in_proj_weight", "attention.out_proj.weight",
                                 "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1",
                                 "head.weight"]
    with torch.no_grad():
        for s in masks.mask_parameters():
            s.uniform_(-1, 1)
    masks.temperature = 5.0
    x = torch.randn(3, 4, 6)
    out = model(x)
    out.sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in masks.mask_parameters())
    # the same network, built from the formula: W * scale * sigmoid(beta * s) in every selected place
    with torch.no_grad():
        for name, mask in masks:
            target = plain.get_parameter(name)
            target.mul_(mask.scale * torch.sigmoid(5.0 * mask.logits))
        torch.testing.assert_close(out, plain(x))

    masks.harden()
    hard = model(x)
    zeros = sum(int((model.get_parameter(name) == 0).sum()) for name in masks.masks)
    assert zeros == sum(int((~mask.binary_mask()).sum()) for _, mask in masks) > 0
    permanent = masks.make_permanent()
    assert not parametrize_keys(permanent)
    reloaded = Recurrent()
    reloaded.load_state_dict(permanent.state_dict())  # the plain architecture takes the weights
    torch.testing.assert_close(reloaded(x), hard)


def parametrize_keys(model: nn.Module) -> list[str]:
    return [key for key in model.state_dict() if "parametrizations" in key or "cs_mask" in key]


def test_second_order_gradients_through_the_mask_match_plain_autograd():
    """create_graph=True (MAML, gradient-norm penalties): the mask's backward is differentiable."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False).double()
    masks = cs.attach_masks(layer, mask_init=-0.2)
    masks.fuse_penalty(0.1)
    with torch.no_grad():
        masks.masks["weight"].logits.normal_()
    masks.temperature = 2.0
    weight, logits = masks.masked_weights()["weight"], masks.masks["weight"].logits
    x = torch.randn(5, 3, dtype=torch.float64)
    ours = torch.autograd.grad(layer(x).pow(2).sum(), (weight, logits), create_graph=True)
    ours = torch.autograd.grad(sum(g.pow(2).sum() for g in ours), (weight, logits))

    w, s = weight.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    soft = torch.sigmoid(2.0 * s)
    loss = (x @ (w * soft / sigmoid(-0.2)).T).pow(2).sum() + 0.1 * soft.sum()
    first = torch.autograd.grad(loss, (w, s), create_graph=True)
    reference = torch.autograd.grad(sum(g.pow(2).sum() for g in first), (w, s))
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_func_per_sample_gradients_of_a_masked_model():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    masks = cs.attach_masks(model, mask_init=-0.05)
    params = dict(model.named_parameters())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def loss(p, xb, yb):
        return F.cross_entropy(torch.func.functional_call(model, p, (xb[None],)), yb[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    name = "parametrizations.weight.0.logits"
    for i in range(5):
        model.zero_grad()
        loss(params, x[i], y[i]).backward()
        torch.testing.assert_close(per_sample[name][i], masks.masks["weight"].logits.grad)
    masks.fuse_penalty(1e-3)
    with pytest.raises(RuntimeError, match=r"fuse_penalty does not work under torch\.func"):
        torch.func.grad(loss)(params, x[0], y[0])


def test_loading_a_state_takes_its_mask_init_and_scaling():
    """s0 and the scaling are part of the network: a state loaded into masks attached with other
    settings reproduces the saved network, and a later reset uses the saved s0."""
    torch.manual_seed(0)
    saved = nn.Linear(4, 3)
    masks = cs.attach_masks(saved, mask_init=-0.05)
    with torch.no_grad():
        masks.masks["weight"].logits.uniform_(0.1, 0.3)  # kept entries: a reset puts them back to s0
    masks.temperature = 5.0
    x = torch.randn(2, 4)
    for other in ({"mask_init": 0.0}, {"mask_init": -0.05, "scale_by_init": False}):
        fresh = nn.Linear(4, 3)
        fresh_masks = cs.attach_masks(fresh, **other)
        fresh.load_state_dict(saved.state_dict())
        torch.testing.assert_close(fresh(x), saved(x))
        fresh_masks.reset_logits()
        assert torch.all(fresh_masks.masks["weight"].logits == -0.05)


def test_masks_built_on_the_meta_device_are_initialised_by_reset_parameters():
    """After ``to_empty()``, the masks' reset_parameters gives the logits s0. The weights are the
    user's to initialise through ``parametrizations.weight.original``: Linear.reset_parameters
    writes into the computed (masked) weight, a temporary."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        masks = cs.attach_masks(model, mask_init=-0.05)
    model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, ContinuousMask):
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.parametrizations.weight.original)
            nn.init.zeros_(module.bias)
    assert all(torch.all(s == -0.05) for s in masks.mask_parameters())
    assert masks.weights_remaining() == 0.0 and masks.masks["0.weight"].temperature == 1.0
    assert torch.isfinite(model(torch.randn(3, 4))).all()


def test_a_state_loaded_with_assign_into_a_meta_model_leaves_nothing_on_meta():
    """The temperature tensor is not in the state_dict: it must follow the assigned logits
    (torch.compile reads it) instead of staying on the meta device."""
    source = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    cs.attach_masks(source, mask_init=-0.05).temperature = 3.0
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        masks = cs.attach_masks(model, mask_init=-0.05)
    model.load_state_dict(source.state_dict(), assign=True)
    assert all(not t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert masks.temperature == 3.0 and masks.masks["0.weight"]._temperature_tensor.item() == 3.0


def hardened_layer(n_in: int, n_out: int):
    """A one-layer model with a random hard mask (about half the weights kept)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, n_out))
    masks = cs.attach_masks(model, mask_init=0.0)
    with torch.no_grad():
        masks.masks["0.weight"].logits.normal_()
    masks.harden()
    return model, masks


def test_reset_parameters_leaves_a_hardened_ticket_alone():
    model, masks = hardened_layer(6, 4)
    kept = masks.weights_remaining()
    for module in model.modules():  # the usual way to re-initialise a ticket's weights
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    masks.zero_pruned()
    assert masks.weights_remaining() == kept < 1
    assert int((model[0].weight == 0).sum()) == int((~masks.binary_masks()["0.weight"]).sum())


def test_zero_pruned_uses_the_masks_after_a_dtype_change():
    model, masks = hardened_layer(4, 4)
    masks.zero_pruned()  # before the buffers are replaced
    model.double()
    keep = torch.rand(4, 4) < 0.5
    masks.set_hard_masks({"0.weight": keep})  # writes into the new buffers
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    masks.zero_pruned()
    assert torch.equal(model[0].weight != 0, keep)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("also_outside", [True, False])
def test_fused_penalty_once_under_activation_checkpointing(reentrant, also_outside):
    """A layer used inside (and outside) a checkpointed segment: the recomputation in the backward
    pass does not add the penalty again, and under reentrant checkpointing, whose first pass runs
    without gradients, it is added at all."""
    from torch.utils.checkpoint import checkpoint

    grads = []
    for fused in (False, True):
        torch.manual_seed(0)
        layer = nn.Linear(5, 5)
        masks = cs.attach_masks(layer, mask_init=0.0)
        masks.temperature = 3.0
        x = torch.randn(4, 5, requires_grad=reentrant)  # reentrant checkpointing needs an input that requires grad
        if fused:
            masks.fuse_penalty(0.2)
        hidden = checkpoint(nn.Sequential(layer, nn.Tanh()), x, use_reentrant=reentrant)
        loss = (layer(hidden) if also_outside else hidden).pow(2).mean()
        if not fused:
            loss = loss + 0.2 * masks.penalty()
        loss.backward()
        grads.append(masks.masks["weight"].logits.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


# -- found by a review of masks on users' own models ---------------------------------------------

def test_the_penalty_has_second_order_gradients():
    """``grad(penalty, s, create_graph=True)`` can be differentiated again (a gradient-norm
    regulariser): its second derivative equals the plain formula's."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    masks = cs.attach_masks(layer, mask_init=0.0)
    masks.temperature = 2.0
    logits = masks.masks["weight"].logits
    with torch.no_grad():
        logits.normal_()
    x = torch.randn(5, 4, dtype=torch.float64)
    results = []
    for plain in (False, True):
        total = layer(x).pow(2).sum() + (torch.sigmoid(2.0 * logits).sum() if plain else masks.penalty())
        (grad,) = torch.autograd.grad(total, logits, create_graph=True)
        (second,) = torch.autograd.grad(grad.pow(2).sum(), logits)
        results.append(second)
    torch.testing.assert_close(results[0], results[1])


def test_the_penalty_does_not_reuse_a_mask_of_other_logits():
    """After a forward pass with substituted logits (torch.func.functional_call), the penalty is
    computed from the module's own logits."""
    layer = nn.Linear(3, 2)
    masks = cs.attach_masks(layer, mask_init=0.0)
    other = torch.full((2, 3), 5.0)
    torch.func.functional_call(layer, {"parametrizations.weight.0.logits": other}, (torch.randn(1, 3),))
    assert float(masks.penalty()) == pytest.approx(6 * 0.5)


def test_a_forward_under_fake_tensor_mode_leaves_later_forwards_real():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    layer = nn.Linear(3, 2)
    cs.attach_masks(layer, mask_init=0.0)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = layer(mode.from_tensor(torch.randn(1, 3)))
    assert isinstance(fake, FakeTensor)
    out = layer(torch.randn(1, 3))
    assert type(out) is torch.Tensor and type(layer.weight) is torch.Tensor


def test_zero_pruned_acts_on_weights_loaded_with_assign():
    model, masks = hardened_layer(6, 4)
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new Parameter objects in the layer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    masks.keep_pruned_at_zero(optimizer)
    model(torch.randn(8, 6)).pow(2).sum().backward()
    optimizer.step()
    assert int((model[0].weight != 0).sum()) == int(masks.binary_masks()["0.weight"].sum())


def test_set_hard_masks_refuses_masks_that_do_not_fit():
    _, masks = hardened_layer(4, 3)
    with pytest.raises(ValueError, match="no masked weight named 'nope'"):
        masks.set_hard_masks({"nope": torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"shape \(3, 1\) != weight shape \(3, 4\)"):
        masks.set_hard_masks({"0.weight": torch.ones(3, 1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="only 0 and 1"):
        masks.set_hard_masks({"0.weight": torch.full((3, 4), 0.5)})
    masks.set_hard_masks({"0.weight": torch.ones(3, 4)})  # 0/1 floats are fine


def test_harden_refuses_to_drop_a_parametrization_added_after_the_mask():
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, weight):
            return weight.triu() + weight.triu(1).transpose(0, 1)

    layer = nn.Linear(3, 3)
    masks = cs.attach_masks(layer, mask_init=0.0)
    parametrize.register_parametrization(layer, "weight", Symmetric())
    with pytest.raises(ValueError, match="registered after its CS mask \\(Symmetric\\)"):
        masks.harden()
    assert masks.mode == "soft" and parametrize.is_parametrized(layer, "weight")


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_a_temperature_must_be_positive_and_finite(beta):
    masks = cs.attach_masks(nn.Linear(2, 2), mask_init=0.0)
    with pytest.raises(ValueError, match="positive finite"):
        masks.temperature = beta


def test_layer_types_may_be_a_list_and_must_be_module_classes():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Conv1d(1, 1, 1))
    assert LayerSelection(layer_types=[nn.Linear]).select(model) == ["0"]
    with pytest.raises(ValueError, match=r"nn\.Module classes"):
        LayerSelection(layer_types=["Linear"])


def test_jit_trace_records_the_masked_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    masks = cs.attach_masks(model, mask_init=-0.1)
    masks.fuse_penalty(1e-3)
    masks.temperature = 4.0
    x = torch.randn(5, 4)
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))


# -- found by a review of the API (2026-11-27) ------------------------------------------------


class Siamese(nn.Module):
    """One encoder reached under two names (``enc_b`` is ``enc``), as weight-sharing models do."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.enc_b = self.enc
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.enc(x)) + torch.relu(self.enc_b(-x)))


@pytest.mark.parametrize("build", [Siamese, lambda: nn.Sequential(*[nn.Linear(8, 8)] * 3, nn.Linear(8, 2))],
                         ids=["siamese", "one-layer-three-times"])
@pytest.mark.parametrize("point_in", ["soft", "hard"])
def test_a_module_under_several_names_rewinds_to_the_tickets_start(build, point_in):
    """The state_dict lists a shared module's masked weight under each of its names: rewinding
    must restore it once, as ``scale * H * W_k`` (it raised KeyError, or scaled twice)."""
    torch.manual_seed(0)
    model = build()
    masks = cs.attach_masks(model, mask_init=-0.1)
    with torch.no_grad():
        for logits in masks.mask_parameters():
            logits.normal_()
    start = {name: weight.detach().clone() for name, weight in masks.masked_weights().items()}
    if point_in == "hard":
        masks.harden()
        point = masks.rewind_point()
    else:
        point = masks.rewind_point()
        masks.harden()
    with torch.no_grad():
        for weight in masks.masked_weights().values():
            weight.add_(1.0)  # training moved them
    masks.rewind(point)
    for name, mask in masks:
        expected = start[name] * mask.scale * mask.hard_mask
        assert torch.allclose(masks.masked_weights()[name], expected), name
        assert mask.hard_mask.any() and not mask.hard_mask.all()


def test_harden_on_the_meta_device_and_its_repr():
    """Build on meta, attach, harden, then load a hardened state_dict with assign=True: the
    emptiness check has no values to read there."""
    torch.manual_seed(0)
    real = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    real_masks = cs.attach_masks(real, mask_init=0.5)
    real_masks.harden()
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = cs.attach_masks(model, mask_init=0.5)
    assert "remaining" not in repr(masks) and "mode=soft" in repr(masks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks.harden()
    model.load_state_dict(real.state_dict(), assign=True)
    x = torch.randn(3, 8)
    assert torch.equal(model(x), real(x))
    assert "remaining=1.0000" in repr(cs.find_masks(model))


def test_a_refused_layer_leaves_every_layer_unmasked():
    """attach_masks checks every layer before it changes any: fixing the cause and trying again works."""
    from torch.nn.utils import parametrizations, parametrize

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    parametrizations.weight_norm(model[2])
    with pytest.raises(ValueError, match=r"2\.weight already has a parametrization \(_WeightNorm\)"):
        cs.attach_masks(model)
    assert not parametrize.is_parametrized(model[0])
    parametrize.remove_parametrizations(model[2], "weight")
    assert list(cs.attach_masks(model).masks) == ["0.weight", "2.weight"]
    lazy = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"2\.weight belongs to a lazy module \(LazyLinear\) whose shape is not "
                                         "known yet: run one batch through the model"):
        cs.attach_masks(lazy)
    assert not parametrize.is_parametrized(lazy[0])
    lazy(torch.randn(2, 4))
    assert len(cs.attach_masks(lazy)) == 2


def test_the_fused_penalty_is_refused_in_data_parallel_replicas():
    """nn.DataParallel's replicas each add it and their gradients are summed: N times too strong."""
    layer = nn.Linear(4, 4)
    masks = cs.attach_masks(layer)
    mask = masks.masks["weight"]
    weight = layer.parametrizations.weight.original

    def replica():  # what nn.DataParallel does to every module at every forward pass
        copy = mask._replicate_for_data_parallel()
        copy.logits = mask.logits.view_as(mask.logits)  # and a copy of each parameter
        return copy

    assert torch.equal(replica()(weight), mask(weight))  # no fused penalty: nothing to count twice
    masks.fuse_penalty(0.1)
    with pytest.raises(RuntimeError, match=r"once per nn\.DataParallel replica: use DistributedDataParallel"):
        replica()(weight)
    mask(weight).sum().backward()  # the model itself trains as before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_penalty_of_a_low_precision_model_is_summed_in_float32(dtype):
    """float16 stops at 65504: a 1000x200 layer at s0 = 0 summed to inf."""
    model = nn.Linear(1000, 200).to(dtype)
    masks = cs.attach_masks(model, mask_init=0.0)
    penalty = masks.penalty()
    assert penalty.dtype == torch.float32 and penalty.item() == 100_000
    assert masks.penalty(normalize=True).item() == 0.5
    penalty.backward()
    grad = masks.mask_parameters()[0].grad
    assert grad.dtype == dtype and torch.all(grad == 0.25)  # beta * m * (1 - m) at m = 1/2
    masks.harden(warn_empty=False)
    assert masks.penalty().dtype == torch.float32


def test_make_permanent_keeps_the_parameter_order_of_the_plain_model():
    """An optimiser state_dict, or a zip of two models' parameters, goes by that order."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))

    plain_names = [name for name, _ in build().named_parameters()]
    model = build()
    masks = cs.attach_masks(model, mask_init=0.5)
    masks.harden()  # the weight comes last while hardened: resumed checkpoints' optimiser states expect it
    assert set(cs.masking.plain_state_dict(model)) == set(build().state_dict())
    masks.make_permanent()
    assert [name for name, _ in model.named_parameters()] == plain_names
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    fresh = build()
    fresh.load_state_dict(model.state_dict())
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh(torch.randn(2, 8)).sum().backward()
    fresh_optimizer.step()  # a state of another shape failed here


def test_plain_state_dict_and_count_zeros_of_a_hardened_model():
    model, masks = masked_mlp((8, 16, 4), temperature=1.0)
    with pytest.raises(ValueError, match="harden the masks first"):
        cs.masking.plain_state_dict(model)
    masks.harden()
    state = model.state_dict()
    assert any(not isinstance(value, torch.Tensor) for value in state.values())  # the masks' settings
    zeros, total = count_zeros(state)  # skips them (it raised AttributeError)
    plain = cs.masking.plain_state_dict(model)
    assert set(plain) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    pruned = sum(int((mask.hard_mask == 0).sum()) for _, mask in masks)
    assert pruned > 0
    assert count_zeros({name: plain[name] for name in ("0.weight", "2.weight")}) == (pruned, 8 * 16 + 16 * 4)
    assert total == sum(value.numel() for value in plain.values()) + 2 * (8 * 16 + 16 * 4)  # + logits, hard masks
    assert zeros >= pruned + pruned  # the pruned weights and their hard masks' zeros


def test_find_masks_refuses_a_model_without_masks():
    with pytest.raises(ValueError, match="Sequential carries no CS masks: attach them with attach_masks"):
        cs.find_masks(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("kwargs, message", [
    ({"layer_types": nn.Linear(2, 2)}, "the class, not an instance"),
    ({"layer_types": None}, "layer_types must be nn.Module classes, got None"),
    ({"layer_types": F.linear}, "layer_types must be nn.Module classes"),
    ({"layer_types": ()}, "layer_types must be nn.Module classes"),
    ({"include": 5}, "include must be a regular expression or a list of them, got 5"),
    ({"exclude_first": "no"}, "exclude_first must be True or False, got 'no'"),
])
def test_layer_selection_refuses_arguments_it_cannot_use(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LayerSelection(**kwargs)


def test_temperature_schedule_refuses_an_epoch_before_the_first():
    schedule = TemperatureSchedule(200.0, 3)
    for epoch in (-1, 1.5):
        with pytest.raises(ValueError, match="epoch must be a whole number >= 0"):
            schedule.value(epoch)
    assert schedule.value(2) == 200.0


def test_make_permanent_bakes_the_zeros_in_even_when_training_moved_them():
    """Without keep_pruned_at_zero, optimiser steps after harden() move pruned weights: the plain
    model must still be W * scale * H(s), as the masks report it."""
    model, masks = masked_mlp((8, 16, 4), temperature=1.0)
    masks.harden()
    kept = masks.weights_remaining()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
    plain = masks.make_permanent()
    weights = [plain[0].weight, plain[2].weight]
    assert sum(int(w.count_nonzero()) for w in weights) == round(kept * sum(w.numel() for w in weights))


def test_make_permanent_restores_the_order_of_a_module_with_several_masked_weights():
    """An LSTM's weight_ih_l0 and weight_hh_l0: positions recorded before either is taken out."""
    torch.manual_seed(0)
    model = nn.LSTM(4, 5)
    plain_names = [name for name, _ in nn.LSTM(4, 5).named_parameters()]
    masks = cs.attach_masks(model, 0.5, selection=LayerSelection(layer_types=(nn.LSTM,),
                                                                 parameters=(r"weight_(ih|hh)_l\d+",)))
    masks.harden()
    masks.make_permanent()
    assert [name for name, _ in model.named_parameters()] == plain_names


def test_a_rewind_leaves_the_masks_of_another_mask_set_alone():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    first = cs.attach_masks(model, 0.5, selection=LayerSelection(include=[r"^0$"]))
    second = cs.attach_masks(model, -0.5, selection=LayerSelection(include=[r"^2$"]))
    point = first.rewind_point()
    assert not any("logits" in key or "hard_mask" in key for key in point)
    with torch.no_grad():
        second.masks["2.weight"].logits.fill_(3.0)
    first.rewind(point)
    assert torch.all(second.masks["2.weight"].logits == 3.0)


def test_a_rewind_point_with_a_shared_modules_other_names_still_loads():
    """Older versions stored a module reached under several names under each name."""
    torch.manual_seed(0)
    model = Siamese()
    masks = cs.attach_masks(model, mask_init=-0.1)
    point = masks.rewind_point()
    older = {**point, "enc_b.parametrizations.weight.original": point["enc.weight"]}
    with torch.no_grad():
        masks.masked_weights()["enc.weight"].add_(1.0)
    masks.rewind(older)
    assert torch.equal(masks.masked_weights()["enc.weight"], point["enc.weight"])
    with pytest.raises(KeyError, match="no tensor named extra"):
        masks.rewind({**point, "extra": torch.zeros(1)})


def test_layer_selection_takes_any_collection_of_types_and_patterns():
    selection = LayerSelection(layer_types=frozenset({nn.Linear}), include=(p for p in ["^0$"]))
    assert selection.layer_types == (nn.Linear,) and selection.include == ("^0$",)
    assert LayerSelection(layer_types={nn.Linear: 1}.keys()).layer_types == (nn.Linear,)

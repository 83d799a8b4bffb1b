"""The engine: what gradient-based methods receive and where their direction goes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import manytask as mt
from manytask.balance import engine
from manytask.balance.base import GramianWeighting
from manytask.errors import ConfigError


class Fixed(GramianWeighting):
    """A test weighting with fixed weights, to check the plumbing (not registered)."""

    def __init__(self, tasks, w):
        super().__init__(tasks)
        self.w = torch.tensor(w, dtype=torch.float64)
        self.seen: list[torch.Tensor] = []

    def weights(self, gramian, losses):
        self.seen.append(gramian.clone())
        return self.w


def model_and_losses(seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(5, 1), nn.Linear(5, 1)])
    x = torch.randn(6, 4)
    z = encoder(x)
    losses = {f"t{i}": (head(z) ** 2).mean() * (i + 1) for i, head in enumerate(heads)}
    return encoder, heads, z, losses


def reference(seed=0):
    """Per-task gradients by plain autograd, for comparison."""
    encoder, heads, z, losses = model_and_losses(seed)
    shared = list(encoder.parameters())
    rows, head_grads = [], []
    for i, loss in enumerate(losses.values()):
        grads = torch.autograd.grad(loss, shared + list(heads[i].parameters()), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
        head_grads.append([g.clone() for g in grads[len(shared) :]])
    zgrads = [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses.values()]
    return torch.stack(rows), head_grads, zgrads


def test_parameter_mode_gives_shared_jt_w_and_heads_their_own_gradient():
    jacobian, head_grads, _ = reference()
    encoder, heads, _, losses = model_and_losses()
    shared = list(encoder.parameters())
    for p in shared:  # an existing gradient is kept, as loss.backward() would
        p.grad = torch.ones_like(p)
    method = Fixed(["t0", "t1"], [0.25, 2.0])
    step = method.backward(losses, shared=shared)
    d = torch.tensor([0.25, 2.0]) @ jacobian
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(got, d + 1.0, atol=1e-6)
    for i, head in enumerate(heads):  # unweighted own-task gradient
        for p, g in zip(head.parameters(), head_grads[i], strict=True):
            assert torch.allclose(p.grad, g, atol=1e-6)
    assert torch.allclose(method.seen[0].float(), jacobian @ jacobian.T, atol=1e-5)
    assert torch.allclose(step.grad_norms, jacobian.norm(dim=1), atol=1e-5)
    unit = jacobian / jacobian.norm(dim=1, keepdim=True)
    assert torch.allclose(step.cosines, unit @ unit.T, atol=1e-5)  # computed on first reading
    assert step.synced == tuple(shared)


def test_feature_mode_backpropagates_the_direction_through_the_encoder_once():
    _, head_grads, zgrads = reference()
    encoder, heads, z, losses = model_and_losses()
    w = torch.tensor([0.5, 3.0])
    method = Fixed(["t0", "t1"], w.tolist()).configure(mode="features")
    assert method.needs is mt.balance.Need.FEATURE_GRADIENTS
    method.backward(losses, features=z)
    # encoder gradient = ∂z/∂θ · (Σ wᵢ ∂Lᵢ/∂z)
    enc2, _, z2, _ = model_and_losses()
    dz = w[0] * zgrads[0] + w[1] * zgrads[1]
    expected = torch.autograd.grad(z2, list(enc2.parameters()), grad_outputs=dz)
    for p, g in zip(encoder.parameters(), expected, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)
    for i, head in enumerate(heads):
        for p, g in zip(head.parameters(), head_grads[i], strict=True):
            assert torch.allclose(p.grad, g, atol=1e-6)
    gram = torch.stack([g.reshape(-1) for g in zgrads])
    assert torch.allclose(method.seen[0].float(), gram @ gram.T, atol=1e-6)


@pytest.mark.parametrize("name", ["mgda", "pcgrad"])
def test_one_pass_feature_mode_equals_the_per_task_path(name):
    """A model that gives each head its own view of the features needs one backward pass;
    the result equals differentiating each loss separately."""
    torch.manual_seed(3)
    tasks = mt.TaskSet([mt.Task("a", "mse"), mt.Task("b", "mse"), mt.Task("c", "l1")])
    model = mt.nn.SharedBottom(mt.nn.MLPEncoder((4,), [6, 5]), tasks)
    x, y = torch.randn(9, 4), {t: torch.randn(9) for t in tasks}

    def run(views: bool) -> list[torch.Tensor]:
        model.zero_grad()
        outputs, features = model(x, return_features=True)
        losses = tasks.losses(outputs, y)
        torch.manual_seed(0)
        balancer = mt.balance.get(name, tasks.names, mode="features")
        z = features if views else features[0]._base
        if not views:  # heads read views of z; the per-task path differentiates through them
            z = [features[0]._base]
        balancer.backward(losses, features=z)
        return [p.grad.clone() for p in model.parameters()]

    for one, two in zip(run(True), run(False), strict=True):
        assert torch.allclose(one, two, atol=1e-6)


def test_update_every_reuses_the_last_weights_between_updates():
    method = Fixed(["t0", "t1"], [0.3, 0.7]).configure(update_every=3)
    for step_index in range(7):
        encoder, _, _, losses = model_and_losses(step_index)
        method.backward(losses, shared=list(encoder.parameters()))
    assert len(method.seen) == 3  # steps 0, 3, 6
    # a reused step is one backward of Σ wᵢ Lᵢ
    encoder, _, _, losses = model_and_losses(1)
    method = Fixed(["t0", "t1"], [0.3, 0.7]).configure(update_every=2)
    method.backward(losses, shared=list(encoder.parameters()))
    encoder, _heads, _, losses = model_and_losses(1)
    method.backward(losses, shared=list(encoder.parameters()))
    e2, _, _, l2 = model_and_losses(1)
    (0.3 * l2["t0"] + 0.7 * l2["t1"]).backward()
    for p, q in zip(encoder.parameters(), e2.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_log_transform_balances_log_losses():
    encoder, _, _, losses = model_and_losses()
    method = Fixed(["t0", "t1"], [1.0, 1.0]).configure(loss_transform="log")
    method.backward(losses, shared=list(encoder.parameters()))
    e2, _, _, l2 = model_and_losses()
    (torch.log(l2["t0"]) + torch.log(l2["t1"])).backward()
    for p, q in zip(encoder.parameters(), e2.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


@pytest.mark.parametrize(("name", "share"), [("ew", 1.0), ("mgda", 1.0), ("upgrad", 0.5)])
def test_log_transform_leaves_an_absent_tasks_zero_loss_as_it_is(name, share):
    # a zero loss (a task absent from the batch) has no log: it stays zero, the others are
    # balanced on their logs; before, its −∞ made every gradient NaN. (UPGrad averages its
    # projected gradients over the T tasks, the absent one's being 0: half of t0's.)
    encoder, _, _, losses = model_and_losses()
    losses["t1"] = losses["t1"] * 0.0
    method = mt.balance.get(name, ["t0", "t1"], loss_transform="log")
    method.backward(losses, shared=list(encoder.parameters()))
    e2, _, _, l2 = model_and_losses()
    (share * torch.log(l2["t0"])).backward()
    for p, q in zip(encoder.parameters(), e2.parameters(), strict=True):
        assert torch.isfinite(p.grad).all()
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


@pytest.mark.parametrize("name", ["uw", "mgda"])
def test_grad_scaler_gives_the_unscaled_update(name):
    encoder, heads, _, losses = model_and_losses()
    params = [*encoder.parameters(), *heads.parameters()]
    balancer = mt.balance.get(name, ["t0", "t1"])
    opt = torch.optim.SGD([*params, *balancer.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    balancer.backward(losses, shared=list(encoder.parameters()), scaler=scaler)
    scaler.unscale_(opt)
    e2, h2, _, l2 = model_and_losses()
    reference_balancer = mt.balance.get(name, ["t0", "t1"])
    reference_balancer.backward(l2, shared=list(e2.parameters()))
    for p, q in zip(params, [*e2.parameters(), *h2.parameters()], strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_misuse_is_an_error():
    _encoder, _, z, losses = model_and_losses()
    with pytest.raises(ConfigError, match="needs the shared parameters"):
        mt.balance.get("mgda", ["t0", "t1"]).backward(losses)
    with pytest.raises(ConfigError, match="needs the shared representation"):
        mt.balance.get("mgda", ["t0", "t1"], mode="features").backward(losses)
    with pytest.raises(ConfigError, match="detached"):
        mt.balance.get("mgda", ["t0", "t1"], mode="features").backward(losses, features=z.detach())
    with pytest.raises(ConfigError, match="does not take mode"):
        mt.balance.get("ew", ["t0", "t1"], mode="features")
    with pytest.raises(ConfigError, match="update_every must be"):
        mt.balance.get("mgda", ["t0", "t1"], update_every=0)
    with pytest.raises(ConfigError, match="bad value for 'mode'"):
        mt.balance.get("mgda", ["t0", "t1"], mode="param")


@pytest.mark.parametrize("columns", [5, (1 << 15) + 3, 1 << 16])
def test_gramian_in_column_blocks_equals_j_jt(columns):
    """Wide Jacobians on a CPU take the Gramian as a batched sum over 8 column blocks (plus the
    columns left over); it is J Jᵀ up to the order of the sums."""
    jacobian = torch.randn(6, columns, generator=torch.Generator().manual_seed(columns))
    expected = jacobian.double() @ jacobian.double().T
    result = engine.gramian(jacobian)
    assert result.dtype == torch.float32 and result.shape == (6, 6)
    assert torch.allclose(result.double(), expected, rtol=1e-5, atol=1e-3)


def nearly_opposite(eps: float) -> torch.Tensor:
    """Two float64 gradients at an angle of π − ε, the second 10× the first (a toy problem's
    Pareto front, where float32 cannot tell them from exactly opposite)."""
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = -10.0 * torch.tensor([math.cos(eps), math.sin(eps)], dtype=torch.float64)
    return torch.stack([g1, g2])


@pytest.mark.parametrize("mode", ["parameters", "features"])
def test_a_float64_model_gets_the_float64_nash_direction_of_nearly_opposite_gradients(mode):
    # Gα = 1/α for two tasks: α₂ = α₁√(a/c) and α₁ = 1/√(a + b√(a/c)), for G = [[a, b], [b, c]]
    jac = nearly_opposite(1e-3)
    (a, b), (_, c) = (jac @ jac.T).tolist()
    alpha1 = 1 / math.sqrt(a + b * math.sqrt(a / c))
    expected = alpha1 * jac[0] + alpha1 * math.sqrt(a / c) * jac[1]  # along the bisector
    x = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    balancer = mt.balance.get("nash_mtl", ["a", "b"], mode=mode, max_norm=0.0)
    if mode == "parameters":
        losses = {"a": jac[0] @ x, "b": jac[1] @ x}
        balancer.backward(losses, shared=[x])
    else:
        z = x * 1.0
        views = [z[None], z[None]]
        losses = {"a": (jac[0] * views[0]).sum(), "b": (jac[1] * views[1]).sum()}
        balancer.backward(losses, features=views)
    assert x.grad is not None and x.grad.dtype == torch.float64
    # a float32 Jacobian (the engine before) gave (6.1e-4, -1.15): 19% off
    assert torch.allclose(x.grad, expected, rtol=1e-4, atol=0), (x.grad, expected)


def test_the_jacobian_follows_a_float64_model_and_stays_float32_otherwise():
    for dtype, gathered in [(torch.float64, torch.float64), (torch.float32, torch.float32)]:
        p = nn.Parameter(torch.ones(3, dtype=dtype))
        jacobian = engine.shared_jacobian([p.sum(), (2 * p).sum()], [p])
        assert jacobian.dtype == gathered
        assert torch.equal(jacobian, torch.tensor([[1.0] * 3, [2.0] * 3], dtype=gathered))
    assert engine.jacobian_dtype(torch.bfloat16) == torch.float32


def test_linear_head_rows_give_the_gramian_and_direction_of_their_dense_rows():
    g = torch.Generator().manual_seed(0)
    widths = [1, 3, 2]
    deltas = torch.randn(7, sum(widths), generator=g, dtype=torch.float64)
    maps = torch.randn(5, sum(widths), generator=g, dtype=torch.float64)
    rows = engine.LinearHeadRows(deltas, maps, widths)
    dense = rows.dense()
    # row i is δᵢ Mᵢᵀ, written out from the blocks of columns
    blocks = [(0, 1), (1, 4), (4, 6)]
    for i, (a, b) in enumerate(blocks):
        assert torch.allclose(dense[i], (deltas[:, a:b] @ maps[:, a:b].T).reshape(-1))
    assert torch.allclose(rows.gramian(), dense @ dense.T)
    w = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(rows.weighted_sum(w), w @ dense)
    assert torch.allclose(rows.unscaled(torch.tensor(4.0)).dense(), dense / 4)
    single = engine.LinearHeadRows(deltas[:, :3], maps[:, :3], [1, 1, 1])  # one column a task
    assert torch.allclose(single.gramian(), single.dense() @ single.dense().T)
    assert single.dense().is_contiguous()  # row by row, as the reductions over tasks expect
    for i in range(3):  # written out by one broadcast product: exactly the outer products
        assert torch.equal(
            single.dense()[i], (deltas[:, i : i + 1] @ maps[:, i : i + 1].T).flatten()
        )


class LinearHeadModel(nn.Module):
    """An encoder and one head per task whose first layer reads that task's view of the
    representation; ``first`` picks how that layer is written."""

    def __init__(self, widths, first="linear", samples=32, features=24):
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Sequential(nn.Linear(6, features), nn.Tanh())
        self.firsts = nn.ModuleList([nn.Linear(features, h) for h in widths])
        self.outs = nn.ModuleList([nn.Linear(h, 1) for h in widths])
        self.first = first
        self.x, self.y = torch.randn(samples, 6), torch.randn(samples, len(widths))

    def losses(self, views):
        out = {}
        for i, (view, lin, head) in enumerate(zip(views, self.firsts, self.outs, strict=True)):
            if self.first == "linear":
                hidden = lin(view)
            elif self.first == "matmul":  # x @ W, then the bias: mm
                hidden = view @ lin.weight.T + lin.bias
            elif self.first == "addmm_alpha":
                hidden = torch.addmm(lin.bias, view, lin.weight.T, alpha=2.0)
            elif self.first == "read_twice":
                hidden = lin(view) + view.mean(dim=1, keepdim=True)
            elif self.first == "skip":  # the head also reads the encoder's first layer
                hidden = lin(view) + self.encoder[0](self.x).mean(dim=1, keepdim=True)
            else:  # a non-linear first operation
                hidden = lin(torch.tanh(view))
            out[f"t{i}"] = ((head(torch.relu(hidden)).squeeze(-1) - self.y[:, i]) ** 2).mean()
        return out

    def run(self, balancer, views: bool):
        self.zero_grad()
        z = self.encoder(self.x)
        task_views = [z.view_as(z) for _ in self.firsts]
        losses = self.losses(task_views)
        balancer.backward(losses, features=task_views if views else [z])
        return [p.grad.clone() for p in self.parameters() if p.requires_grad]


@pytest.fixture(params=["split", "single"])
def passes(request, monkeypatch):
    """The factored backward split at Z (every size here is far below the default threshold)
    or in a single pass."""
    monkeypatch.setattr(engine, "_SPLIT_FROM", 0 if request.param == "split" else 1 << 62)
    return request.param


@pytest.mark.parametrize("first", ["linear", "matmul", "addmm_alpha", "read_twice", "tanh"])
@pytest.mark.parametrize("name", ["mgda", "upgrad", "nash_mtl"])
def test_feature_mode_with_linear_heads_equals_the_per_task_path(name, first, passes, monkeypatch):
    """Heads that begin with a linear map get their Gramian from factors; every other head
    structure keeps the dense rows. Both give the per-task path's gradients."""
    factored = []
    original = engine._factored_backward

    def spy(*args):
        factored.append(True)
        return original(*args)

    monkeypatch.setattr(engine, "_factored_backward", spy)
    model = LinearHeadModel([1, 2, 1], first)
    tasks = ["t0", "t1", "t2"]
    one_pass = mt.balance.get(name, tasks, mode="features")
    for step in range(2):  # a second step: the heads are searched again, or not
        expected = model.run(mt.balance.get(name, tasks, mode="features"), views=False)
        got = model.run(one_pass, views=True)
        for a, b in zip(got, expected, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (step, (a - b).abs().max())
    linear = first in ("linear", "matmul", "addmm_alpha")
    assert factored == ([True, True] if linear else [])
    assert one_pass._heads.unsuitable is not linear


def test_the_factored_pass_never_forms_the_heads_gradients_of_the_representation(monkeypatch):
    """The heads' pass stops at the products' inputs: no view receives a gradient (a plain
    backward would form and sum T dense products there); the encoder's pass gives Z the
    direction, and every parameter gets the per-task path's gradient."""
    monkeypatch.setattr(engine, "_SPLIT_FROM", 0)
    model = LinearHeadModel([1, 2, 1])
    tasks = ["t0", "t1", "t2"]
    expected = model.run(mt.balance.get("upgrad", tasks, mode="features"), views=False)
    model.zero_grad()
    z = model.encoder(model.x)
    views = [z.view_as(z) for _ in tasks]
    reached = []
    for view in views:
        view.register_hook(lambda grad: reached.append(grad))
    balancer = mt.balance.get("upgrad", tasks, mode="features")
    balancer.backward(model.losses(views), features=views)
    assert reached == [] and not balancer._heads.entangled
    for p, b in zip(model.parameters(), expected, strict=True):
        assert p.grad is not None and torch.allclose(p.grad, b, atol=1e-5, rtol=1e-4)


def test_the_pass_is_split_only_from_the_threshold(monkeypatch):
    """3 heads × 32 × 24 = 2304 entries of products into Z: split from a threshold of 2304,
    a single pass (the views receive their gradients) above it."""
    model = LinearHeadModel([1, 1, 1])
    tasks = ["t0", "t1", "t2"]
    for threshold, split in [(2304, True), (2305, False)]:
        monkeypatch.setattr(engine, "_SPLIT_FROM", threshold)
        z = model.encoder(model.x)
        views = [z.view_as(z) for _ in tasks]
        reached: list[torch.Tensor] = []
        for view in views:
            view.register_hook(reached.append)
        mt.balance.get("mgda", tasks, mode="features").backward(model.losses(views), features=views)
        assert (reached == []) is split, threshold


def test_a_head_that_also_reads_the_encoder_keeps_its_gradient_and_then_the_single_pass(
    monkeypatch,
):
    """A leaf above the views that also feeds Z (here a head adds the encoder's first layer):
    the heads' pass lets nothing through Z, the encoder's pass adds the direction, and the
    model is remembered as entangled (the single pass from then on). Both steps equal the
    per-task path; a pass that let the heads' sum through Z as well would not."""
    monkeypatch.setattr(engine, "_SPLIT_FROM", 0)
    model = LinearHeadModel([1, 1, 1], first="skip")
    tasks = ["t0", "t1", "t2"]
    balancer = mt.balance.get("mgda", tasks, mode="features")
    for step in range(2):
        expected = model.run(mt.balance.get("mgda", tasks, mode="features"), views=False)
        got = model.run(balancer, views=True)
        for a, b in zip(got, expected, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (step, (a - b).abs().max())
        assert balancer._heads.entangled and not balancer._heads.unsuitable


def test_heads_with_frozen_first_layers_still_give_their_factors(passes):
    """The products' nodes run in the heads' pass even when no leaf below them needs a
    gradient (frozen first layers), so every δᵢ is recorded."""
    model = LinearHeadModel([1, 1])
    for layer in model.firsts:
        layer.requires_grad_(False)
    tasks = ["t0", "t1"]
    expected = model.run(mt.balance.get("nash_mtl", tasks, mode="features"), views=False)
    got = model.run(mt.balance.get("nash_mtl", tasks, mode="features"), views=True)
    assert len(got) == len(expected) == 6  # the frozen layers have no gradient
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_factors_are_used_only_where_they_cost_less(monkeypatch):
    factored = []
    original = engine._factored_backward
    monkeypatch.setattr(
        engine, "_factored_backward", lambda *a: (factored.append(True), original(*a))
    )
    # H = 40 columns, B = 32, D = 24: H²(B + D) = 89600 > T²·B·D = 3072 — dense
    wide = LinearHeadModel([20, 20])
    expected = wide.run(mt.balance.get("mgda", ["t0", "t1"], mode="features"), views=False)
    balancer = mt.balance.get("mgda", ["t0", "t1"], mode="features")
    got = wide.run(balancer, views=True)
    assert factored == [] and balancer._heads.unsuitable  # not searched again
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    narrow = LinearHeadModel([1, 1])  # 4·56 < 4·768: factors
    narrow.run(mt.balance.get("mgda", ["t0", "t1"], mode="features"), views=True)
    assert factored == [True]


@pytest.mark.parametrize("widths", [[1, 1, 1], [1, 2, 1]])
@pytest.mark.parametrize("trim", [0, 1])
def test_a_jacobian_aggregator_writes_out_the_factors_of_linear_heads(
    trim, widths, passes, monkeypatch
):
    """A method that reads the rows themselves (the trimmed mean; the other Jacobian
    aggregators but GradDrop refuse feature mode) gets them from the factors of linear heads
    (one broadcast product for one-output heads, a product per head otherwise) where the pass
    is split, and gathered from the single pass elsewhere: the per-task path's gradients."""
    factored = []
    original = engine._factored_backward
    monkeypatch.setattr(
        engine, "_factored_backward", lambda *a: (factored.append(True), original(*a))
    )
    model = LinearHeadModel(widths)
    tasks = ["t0", "t1", "t2"]
    balancer = mt.balance.get("trimmed_mean", tasks, mode="features", trim_number=trim)
    reference = mt.balance.get("trimmed_mean", tasks, mode="features", trim_number=trim)
    for _ in range(3):
        for a, b in zip(model.run(balancer, True), model.run(reference, False), strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert factored == ([True] * 3 if passes == "split" else [])


@pytest.mark.parametrize(("widths", "leak"), [([1, 1, 1], 0.0), ([1, 1, 1], 0.3), ([1, 2, 1], 0.0)])
def test_graddrop_on_linear_head_factors_equals_its_dense_rows(widths, leak, monkeypatch):
    """GradDrop's coordinate sums come from the factors of one-output heads (|δ mᵀ| = |δ||m|ᵀ);
    wider heads are expanded to the rows. Same seed, same draws: the same direction."""
    factored = []
    original = engine._factored_backward
    monkeypatch.setattr(
        engine, "_factored_backward", lambda *a: (factored.append(True), original(*a))
    )
    model = LinearHeadModel(widths)
    tasks = ["t0", "t1", "t2"]
    one_pass = mt.balance.get("graddrop", tasks, mode="features", seed=3, leak=leak)
    per_task = mt.balance.get("graddrop", tasks, mode="features", seed=3, leak=leak)
    for _ in range(2):
        got, expected = model.run(one_pass, True), model.run(per_task, False)
        for a, b in zip(got, expected, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert factored == [True, True]


def test_grad_scaler_with_linear_head_factors_gives_the_unscaled_update(passes):
    model = LinearHeadModel([1, 1])
    tasks = ["t0", "t1"]
    z = model.encoder(model.x)
    views = [z.view_as(z) for _ in tasks]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    mt.balance.get("mgda", tasks, mode="features").backward(
        model.losses(views), features=views, scaler=scaler
    )
    scaled = [p.grad / 2.0**10 for p in model.parameters()]
    expected = model.run(mt.balance.get("mgda", tasks, mode="features"), views=False)
    for a, b in zip(scaled, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)

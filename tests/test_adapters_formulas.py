"""Each adapter method against its formula, on a tiny layer whose numbers can be checked by hand.

The layer is ``Linear(3, 2)`` with ``W = [[1, 0, 2], [0, 1, -1]]`` and ``b = [0.5, -0.5]``; the
adapter parameters are set to small numbers and the expected outputs are computed with plain
matrix products written out in each test, independently of the layer's einsum code.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import manytask.adapters as ad
from manytask.adapters.alignment import alignment_loss
from manytask.adapters.routers import SoftTokenRouter, TopKTokenRouter

W = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
BIAS = torch.tensor([0.5, -0.5])
X = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0], [2.0, 1.0, 0.0]])
TASKS = ["a", "b"]


def base() -> nn.Sequential:
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(W)
        linear.bias.copy_(BIAS)
    return nn.Sequential(linear)


def adapted_layer(method: str, tasks=TASKS, **params) -> tuple[ad.AdaptedModel, ad.AdapterLayer]:
    adapted = ad.inject(base(), method, targets=["0"], tasks=tasks, **params)
    adapted.eval()
    return adapted, adapted.adapter_layers()["0"]


def set_(parameter: torch.Tensor, value) -> None:
    with torch.no_grad():
        parameter.copy_(torch.as_tensor(value, dtype=parameter.dtype))


def plain(x: torch.Tensor) -> torch.Tensor:
    return x @ W.t() + BIAS


A1 = torch.tensor([[1.0, 0.0, -1.0]])  # (r=1, in=3)
B1 = torch.tensor([[2.0], [1.0]])  # (out=2, r=1)
A2 = torch.tensor([[0.0, 1.0, 1.0]])
B2 = torch.tensor([[-1.0], [3.0]])


def test_lora_adds_scaled_b_a_x():
    adapted, layer = adapted_layer("lora", rank=1, alpha=2.0)
    set_(layer.down, A1[None])
    set_(layer.up, B1[None])
    # s = α / r = 2; for x = [1, 2, 3]: A x = -2, B A x = [-4, -2], so h = plain + [-8, -4]
    out = adapted(X)
    assert torch.allclose(out[0], plain(X[:1])[0] + torch.tensor([-8.0, -4.0]))
    assert torch.allclose(out, plain(X) + 2.0 * (X @ A1.t()) @ B1.t())


def test_lora_starts_as_the_base_layer_because_b_is_zero():
    adapted, layer = adapted_layer("lora", rank=2)
    assert torch.count_nonzero(layer.up) == 0 and torch.count_nonzero(layer.down) > 0
    assert torch.equal(adapted(X), plain(X))


def test_lora_per_task_uses_each_samples_own_lora():
    adapted, layer = adapted_layer("lora_per_task", rank=1, alpha=1.0)
    set_(layer.down, torch.stack([A1, A2]))
    set_(layer.up, torch.stack([B1, B2]))
    out = adapted(X, task_ids=torch.tensor([0, 1, 0]))
    expected = torch.stack(
        [
            plain(X[0]) + B1 @ (A1 @ X[0]),
            plain(X[1]) + B2 @ (A2 @ X[1]),
            plain(X[2]) + B1 @ (A1 @ X[2]),
        ]
    )
    assert torch.allclose(out, expected)


def test_multilora_sums_parallel_loras_times_learned_scales():
    adapted, layer = adapted_layer("multilora", modules=2, rank=1, alpha=1.0)
    assert torch.count_nonzero(layer.router.table) == 0  # scales start at 0: identity at start
    assert torch.equal(adapted(X, task_ids=0), plain(X))
    set_(layer.down, torch.stack([A1, A2]))
    set_(layer.up, torch.stack([B1, B2]))
    set_(layer.router.table, [[[0.5, -2.0]]])
    expected = plain(X) + 0.5 * (X @ A1.t()) @ B1.t() - 2.0 * (X @ A2.t()) @ B2.t()
    # one row of scales serves every task
    assert torch.allclose(adapted(X, task_ids=torch.tensor([0, 1, 1])), expected)


def test_multilora_per_feature_scales_each_output_feature():
    adapted, layer = adapted_layer("multilora", modules=2, rank=1, alpha=1.0, per_feature=True)
    set_(layer.down, torch.stack([A1, A2]))
    set_(layer.up, torch.stack([B1, B2]))
    s1, s2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 2.0])
    set_(layer.router.table, torch.stack([s1, s2])[None, None])
    expected = plain(X) + s1 * ((X @ A1.t()) @ B1.t()) + s2 * ((X @ A2.t()) @ B2.t())
    assert torch.allclose(adapted(X, task_ids=0), expected)


@pytest.mark.parametrize("diagonal", [True, False])
def test_mtl_lora_mixes_shared_up_projections_with_task_softmax_and_task_transform(diagonal):
    adapted, layer = adapted_layer(
        "mtl_lora", rank=2, alpha=2.0, up_projections=2, temperature=0.5, diagonal=diagonal
    )
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    b1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b2 = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    set_(layer.down, a[None])
    set_(layer.up, torch.stack([b1, b2]))
    weights = torch.tensor([[0.0, 0.5], [1.0, 0.0]])  # w_t for tasks a and b
    set_(layer.router.table, weights[:, None, :])
    if diagonal:
        lambdas = [torch.diag(torch.tensor([2.0, 1.0])), torch.diag(torch.tensor([1.0, -1.0]))]
        set_(layer.mixer, [[2.0, 1.0], [1.0, -1.0]])
    else:
        lambdas = [torch.tensor([[1.0, 1.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
        set_(layer.mixer, torch.stack(lambdas))
    ids = torch.tensor([1, 0, 1])
    out = adapted(X, task_ids=ids)
    for i, t in enumerate(ids.tolist()):
        g = torch.softmax(weights[t] / 0.5, dim=0)  # exp(w_t^i / τ) / Σ_j exp(w_t^j / τ)
        delta = 1.0 * (g[0] * b1 + g[1] * b2) @ lambdas[t] @ a @ X[i]  # s = α / r = 1
        assert torch.allclose(out[i], plain(X[i]) + delta, atol=1e-6)


def test_mtl_lora_starts_with_identity_transforms_and_kaiming_task_weights():
    _, layer = adapted_layer("mtl_lora", rank=2, up_projections=4, diagonal=False)
    assert torch.equal(layer.mixer, torch.eye(2).expand(2, 2, 2))
    assert layer.router.table.abs().max() <= 1 / math.sqrt(4)
    assert layer.down.shape == (1, 2, 3) and layer.up.shape == (4, 2, 2)


def test_moslora_puts_a_learned_mixer_between_a_and_b():
    adapted, layer = adapted_layer("moslora", rank=2, alpha=2.0)
    a = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    b = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    m = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    set_(layer.down, a[None])
    set_(layer.up, b[None])
    set_(layer.mixer, m[None])
    assert torch.allclose(adapted(X), plain(X) + (X @ (b @ m @ a).t()))


def test_molora_weighs_every_expert_by_a_softmax_of_the_token():
    adapted, layer = adapted_layer("molora", experts=2, rank=1, alpha=1.0)
    set_(layer.down, torch.stack([A1, A2]))
    set_(layer.up, torch.stack([B1, B2]))
    wg = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    set_(layer.router.linear.weight, wg)
    out = adapted(X)  # no task ids needed: the gates come from the input
    g = torch.softmax(X @ wg.t(), dim=1)
    expected = plain(X) + g[:, :1] * ((X @ A1.t()) @ B1.t()) + g[:, 1:] * ((X @ A2.t()) @ B2.t())
    assert torch.allclose(out, expected)


def test_molora_routes_each_token_of_a_sequence_separately():
    adapted, layer = adapted_layer("molora", experts=2, rank=1, alpha=1.0)
    set_(layer.down, torch.stack([A1, A2]))
    set_(layer.up, torch.stack([B1, B2]))
    set_(layer.router.linear.weight, [[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    sequence = X.unsqueeze(0)  # one sample of three tokens
    assert torch.allclose(adapted(sequence)[0], adapted(X))


def test_hydralora_shares_a_and_routes_the_b_heads():
    adapted, layer = adapted_layer("hydralora", heads=2, rank=1, alpha=1.0)
    assert layer.down.shape == (1, 1, 3) and layer.up.shape == (2, 2, 1)
    set_(layer.down, A1[None])
    set_(layer.up, torch.stack([B1, B2]))
    wg = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    set_(layer.router.linear.weight, wg)
    w = torch.softmax(X @ wg.t(), dim=1)
    ax = X @ A1.t()
    expected = plain(X) + w[:, :1] * (ax @ B1.t()) + w[:, 1:] * (ax @ B2.t())
    assert torch.allclose(adapted(X), expected)


@pytest.mark.parametrize("method", ["hydralora", "molora", "smora"])
def test_token_routers_read_the_input_before_dropout(method):
    # dropout acts on the adapters' path only, as HydraLoRA's authors apply it; the router sees
    # every feature of the raw input even in a training forward
    params = {"top_k": 1} if method == "smora" else {}
    adapted, layer = adapted_layer(method, rank=2, dropout=0.5, **params)
    adapted.train()
    seen = []
    layer.router.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    torch.manual_seed(0)
    adapted(X)
    assert len(seen) == 1 and torch.equal(seen[0], X)


def test_smora_activates_the_top_k_ranks_with_a_softmax_over_their_scores():
    adapted, layer = adapted_layer("smora", rank=3, top_k=2, alpha=3.0)  # s = α / r = 1
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # rank i reads x_i
    b = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    set_(layer.down, a.unsqueeze(1))  # three rank-1 experts
    set_(layer.up, b.t().unsqueeze(2))
    scores_w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5]])
    set_(layer.router.linear.weight, scores_w)
    x = torch.tensor([[3.0, 1.0, 2.0]])  # scores [3, 2, 1]: ranks 0 and 1 are active
    g = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    expected = plain(x)[0] + b[:, 0] * g[0] * 3.0 + b[:, 1] * g[1] * 1.0
    assert torch.allclose(adapted(x)[0], expected)


def test_smora_bias_chooses_ranks_without_weighing_them_and_moves_towards_balance():
    _, layer = adapted_layer("smora", rank=3, top_k=1, bias_update_rate=0.1)
    router = layer.router
    set_(router.linear.weight, torch.eye(3))
    x = torch.tensor([[3.0, 1.0, 2.0], [2.5, 0.0, 1.0]])  # both choose rank 0 without bias
    set_(router.bias, [-10.0, 0.0, 0.0])  # the bias sends them to ranks 2 and 2
    gates = router(x)
    assert torch.equal(gates, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    router.train()
    router(x)  # loads c = [0, 0, 2], mean 2/3; the bias waits for the optimizer step
    assert torch.equal(router.bias, torch.tensor([-10.0, 0.0, 0.0]))
    router.move_bias()  # what a step does: b += 0.1 · sign(mean − c)
    assert torch.allclose(router.bias, torch.tensor([-10.0 + 0.1, 0.1, -0.1]))
    router.eval()
    router(x)  # evaluation counts nothing: the next move is none
    router.move_bias()
    assert torch.allclose(router.bias, torch.tensor([-9.9, 0.1, -0.1]))


def test_loss_free_bias_moves_once_per_step_from_the_loads_of_all_micro_batches():
    router = TopKTokenRouter(3, 3, top_k=1, bias_update_rate=0.1, balance_weight=0.0, init_std=0)
    set_(router.linear.weight, torch.eye(3))
    router.train()
    router(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))  # micro-batch 1: c = [2, 0, 0]
    router(torch.tensor([[0.0, 1.0, 0.0]]))  # micro-batch 2: c = [0, 1, 0]
    assert torch.equal(router.bias, torch.zeros(3))
    router.move_bias()  # the step's c = [2, 1, 0], mean 1
    # one move by the summed loads; a move per micro-batch would have given [0, 0, 0.2]
    assert torch.allclose(router.bias, torch.tensor([-0.1, 0.0, 0.1]))
    assert torch.equal(router.pending_load, torch.zeros(3))


def test_loss_free_router_under_checkpointing_gives_the_plain_gradient():
    from torch.utils.checkpoint import checkpoint

    def gradient(checkpointed: bool) -> torch.Tensor:
        router = TopKTokenRouter(3, 3, top_k=2, bias_update_rate=10.0, balance_weight=0, init_std=0)
        set_(router.linear.weight, torch.eye(3))
        router.train()
        x = torch.tensor([[3.0, 1.0, 2.0], [2.5, 0.0, 1.0]], requires_grad=True)
        gates = checkpoint(router, x, use_reentrant=False) if checkpointed else router(x)
        (gates * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        assert x.grad is not None
        return x.grad

    # a bias moved by the first forward would send the recomputed one to other experts
    assert torch.allclose(gradient(True), gradient(False))


@pytest.mark.parametrize("options", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_loss_free_bias_moves_after_each_optimizer_step_of_an_adapted_model(options):
    torch.manual_seed(0)
    adapted, layer = adapted_layer("smora", rank=4, top_k=1, bias_update_rate=0.01)
    copy_layer = copy.deepcopy(adapted).adapter_layers()["0"]  # a copy balances too
    adapted.train()
    optimizer = torch.optim.Adam(adapted.parameters(), lr=1e-2, **options)
    frozen = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # does not hold the router
    moved = []
    for _ in range(2):
        x = torch.randn(8, 3)
        before = layer.router.bias.clone()
        adapted(x).pow(2).sum().backward()
        adapted(torch.randn(8, 3)).pow(2).sum().backward()  # a second micro-batch
        frozen.step()
        moved.append(not torch.equal(before, layer.router.bias))
        load = layer.router.pending_load.clone()
        optimizer.step()
        optimizer.zero_grad()
        expected = before + 0.01 * torch.sign(load.mean() - load)
        assert torch.allclose(layer.router.bias, expected) and load.sum() == 16
        assert torch.equal(layer.router.pending_load, torch.zeros(4))
    assert moved == [False, False]  # forwards and other optimizers' steps leave it alone
    copy_layer.train()
    copy_layer(torch.randn(8, 3)).sum().backward()
    torch.optim.SGD(copy_layer.parameters(), lr=0.1).step()
    assert copy_layer.router.bias.abs().sum() > 0  # the copy moves with its own steps


def test_poly_mixes_skill_parameters_with_the_normalised_allocation():
    adapted, layer = adapted_layer("poly", skills=2, rank=1, alpha=1.0)
    set_(layer.down, torch.stack([A1, A2]))
    set_(layer.up, torch.stack([B1, B2]))
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, -1.0]])
    set_(layer.router.table, logits[:, None, :])
    out = adapted(X, task_ids=torch.tensor([0, 1, 1]))
    for i, t in enumerate([0, 1, 1]):
        z = torch.sigmoid(logits[t])
        z = z / (z.sum() + 1e-12)  # task 0: σ(0) = 1/2, σ(log 3) = 3/4 → z = [0.4, 0.6]
        a_t, b_t = z[0] * A1 + z[1] * A2, z[0] * B1 + z[1] * B2
        assert torch.allclose(out[i], plain(X[i]) + b_t @ a_t @ X[i])  # s = 1 / r = 1
    # mixing parameters is not mixing outputs: (Σ z B)(Σ z A) has cross terms
    z = torch.tensor([0.4, 0.6])
    outputs_mix = z[0] * B1 @ A1 @ X[0] + z[1] * B2 @ A2 @ X[0]
    assert not torch.allclose(out[0], plain(X[0]) + outputs_mix)


def test_poly_samples_a_relaxed_bernoulli_allocation_in_training():
    _, layer = adapted_layer("poly", skills=4, rank=1)
    router = layer.router
    router.train()
    torch.manual_seed(0)
    draws = torch.stack([router(torch.tensor([0])) for _ in range(20)])
    assert not torch.allclose(draws[0], draws[1])  # a fresh sample each call
    assert torch.allclose(draws.sum(-1), torch.ones(20, 1, 1))  # normalised over the skills
    router.eval()
    assert torch.allclose(router(torch.tensor([0])), router(torch.tensor([0])))


def test_mhr_block_formula_on_a_four_by_four_layer():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    adapted = ad.inject(model, "mhr", ["0"], tasks=["a"], heads=2, skills=2, rank=1, alpha=1.0)
    adapted.eval()
    layer = adapted.adapter_layers()["0"]
    a = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[-1.0, 0.0, 1.0, 0.0]]])  # (skills, r, in)
    b = torch.tensor([[[1.0], [0.0], [2.0], [1.0]], [[0.0], [1.0], [-1.0], [3.0]]])
    set_(layer.down, a)
    set_(layer.up, b)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # head 0: [½, ½]; head 1: [.6, .4]
    set_(layer.router.table, logits[None])
    z = [torch.tensor([0.5, 0.5]), torch.tensor([0.6, 0.4])]
    # A_t = [A^(0) | A^(1)] over input blocks {0,1} and {2,3}; B_t stacks output blocks
    head_a = [
        z[k][0] * a[0, :, 2 * k : 2 * k + 2] + z[k][1] * a[1, :, 2 * k : 2 * k + 2] for k in (0, 1)
    ]
    head_b = [z[k][0] * b[0, 2 * k : 2 * k + 2] + z[k][1] * b[1, 2 * k : 2 * k + 2] for k in (0, 1)]
    a_t, b_t = torch.cat(head_a, dim=1), torch.cat(head_b, dim=0)
    x = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    assert torch.allclose(adapted(x, task_ids=0), x @ (b_t @ a_t).t(), atol=1e-6)


def test_c_poly_adds_each_tasks_own_skill_to_its_shared_allocation():
    adapted, layer = adapted_layer("c_poly", shared_skills=1, task_skills=1, rank=1, alpha=1.0)
    # experts: [shared, own of task a, own of task b]
    a_own, b_own = torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[0.0], [1.0]])
    set_(layer.down, torch.stack([A1, a_own, A2]))
    set_(layer.up, torch.stack([B1, b_own, B2]))
    set_(layer.router.table, torch.full((2, 1, 3), 0.3))
    out = adapted(X, task_ids=torch.tensor([0, 1, 0]))
    # one shared skill normalises to 1, one own skill normalises to 1; the other task's
    # own skill gets 0
    mixed = {0: (A1 + a_own, B1 + b_own), 1: (A1 + A2, B1 + B2)}
    for i, t in enumerate([0, 1, 0]):
        a_t, b_t = mixed[t]
        assert torch.allclose(out[i], plain(X[i]) + b_t @ a_t @ X[i], atol=1e-6)


def test_c_poly_without_task_skills_is_poly():
    torch.manual_seed(3)
    one, layer_c = adapted_layer("c_poly", shared_skills=3, task_skills=0, rank=2)
    torch.manual_seed(3)
    two, layer_p = adapted_layer("poly", skills=3, rank=2)
    for parameter in (layer_c.up, layer_p.up):
        set_(parameter, torch.arange(12.0).view(3, 2, 2) / 10)
    ids = torch.tensor([0, 1, 1])
    assert torch.allclose(one(X, task_ids=ids), two(X, task_ids=ids))


def test_align_lora_is_lora_plus_the_weighted_alignment_loss():
    adapted, layer = adapted_layer("align_lora", rank=1, alpha=1.0, align_weight=0.5, dropout=0.0)
    set_(layer.down, A1[None])
    set_(layer.up, B1[None])
    x = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
    assert torch.allclose(adapted(x), plain(x) + (x @ A1.t()) @ B1.t())
    adapted.train()
    adapted(x, task_ids=torch.tensor([0, 0, 1, 1]))

    # codes A x: task a {1, 3} → μ = 2, σ² = 2; task b {-1, -2} → μ = -1.5, σ² = 0.5
    def kl(m1, v1, m2, v2):
        return 0.5 * (math.log(v2 / v1) + v1 / v2 + (m2 - m1) ** 2 / v2 - 1)

    symmetric = 0.5 * (kl(2.0, 2.0, -1.5, 0.5) + kl(-1.5, 0.5, 2.0, 2.0))
    assert torch.allclose(adapted.auxiliary_loss(), torch.tensor(0.5 * symmetric), atol=1e-5)


def test_alignment_loss_is_zero_for_identical_task_distributions_and_skips_lonely_tasks():
    z = torch.tensor([[[1.0]], [[2.0]], [[1.0]], [[2.0]], [[7.0]]])
    ids = torch.tensor([0, 0, 1, 1, 2])  # task 2 has one sample: no variance, left out
    loss = alignment_loss(z, ids, num_tasks=3)
    assert loss is not None and abs(float(loss)) < 1e-6
    assert alignment_loss(z[:2], ids[:2], num_tasks=3) is None  # a single task: nothing to align


def test_scalearn_scales_every_task_adapter_output_per_feature():
    adapted, layer = adapted_layer("scalearn", rank=1, alpha=1.0)
    assert not layer.down.requires_grad and not layer.up.requires_grad  # stage two: frozen
    set_(layer.down, torch.stack([A1, A2]))
    set_(layer.up, torch.stack([B1, B2]))
    omega = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[-1.0, 2.0], [0.0, 1.0]]])  # (T, E, out)
    set_(layer.router.table, omega[:, None])
    out = adapted(X, task_ids=torch.tensor([1, 0, 1]))
    for i, t in enumerate([1, 0, 1]):
        a1 = B1 @ A1 @ X[i]
        a2 = B2 @ A2 @ X[i]
        assert torch.allclose(out[i], plain(X[i]) + omega[t, 0] * a1 + omega[t, 1] * a2)


def test_scalearn_starts_at_the_average_of_the_task_adapters():
    torch.manual_seed(0)
    _, layer = adapted_layer("scalearn", tasks=["a", "b", "c", "d"], rank=1)
    table = layer.router.table
    assert table.shape == (4, 1, 4, 2)
    assert torch.allclose(table, torch.full_like(table, 0.25), atol=5e-3)
    _, uniform = adapted_layer("scalearn", tasks=["a", "b"], rank=1, uniform=True)
    assert uniform.router.table.shape == (2, 1, 2)


def test_soft_router_importance_loss_is_the_squared_coefficient_of_variation():
    router = SoftTokenRouter(3, 2, balance_weight=0.1, init_std=0.0)
    set_(router.linear.weight, [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    router.train()
    gates = router(X)
    importance = gates.sum(0)
    cv2 = importance.var(unbiased=False) / importance.mean() ** 2
    assert torch.allclose(router.auxiliary_loss(), 0.1 * cv2)
    router.eval()
    router(X)
    assert router.auxiliary_loss() is None


def test_top_k_router_switch_loss_is_e_times_sum_of_fraction_times_probability():
    router = TopKTokenRouter(3, 3, top_k=1, bias_update_rate=0.0, balance_weight=1.0, init_std=0)
    set_(router.linear.weight, torch.eye(3))
    router.train()
    router(X)  # top-1 of X: rows choose experts 2, 2, 0 → f = [1/3, 0, 2/3]
    p = torch.softmax(X, dim=1).mean(0)
    expected = 3 * (p[0] / 3 + 2 * p[2] / 3)
    assert torch.allclose(router.auxiliary_loss(), expected)


def test_routed_methods_report_their_balance_loss_through_the_adapted_model():
    adapted, _ = adapted_layer("molora", experts=3, rank=1, balance_weight=0.2)
    adapted.train()
    adapted(X)
    loss = adapted.auxiliary_loss()
    assert loss is not None and loss.requires_grad
    adapted.eval()
    adapted(X)
    assert adapted.auxiliary_loss() is None

"""AdaTT against a restatement of the authors' ``AdaTTSp`` and ``AdaTTWSharedExps``
(facebookresearch/AdaTT, ``mtl_lib.py``, with ``self_exp_res_connect`` on, their default) on
identical weights.

The restated level: every unit ``i`` (the tasks, then the shared unit below the last level)
gates all the level's experts from its own input, and adds its own experts' outputs weighted by
``v_i`` (1 when the unit has one expert): ``f_i = softmax(W_i f_i)ᵀ 𝐄 + v_iᵀ E_i``. The authors'
gates have a bias; manytask's have none, so the restatement has none either. Where a unit has
several experts, the restatement uses manytask's ``v`` (the authors learn it too).
"""

from __future__ import annotations

import pytest
import torch

import manytask as mt
from manytask import registry

F64 = torch.float64


def build(params: dict[str, int], tasks: int = 2) -> torch.nn.Module:
    task_set = mt.TaskSet([mt.Task(f"t{i}", "mse") for i in range(tasks)])
    model = registry.call_with_params(
        "architecture",
        "adatt",
        {"expert_hidden": [5], "tower_hidden": [], **params},
        tasks=task_set,
        input_shape=(7,),
    )
    return model.to(F64).eval()


def native_weights(module: torch.nn.Module, count: int) -> torch.Tensor:
    weight = module.weight
    return torch.ones(1, dtype=F64) if weight is None else weight.detach()


def restated(model, x: torch.Tensor) -> torch.Tensor:
    """The fused representation of every task after the last level, ``(B, T, d)``."""
    tasks, levels, m, shared = len(model.task_names), model.num_levels, model.m, model.m_shared
    counts = [m] * tasks + ([shared] if shared else [])
    inputs = [x] * len(counts)
    for level in range(levels):
        outs = [model.task_experts[level][t](inputs[t]) for t in range(tasks)]
        if shared:
            outs.append(model.shared_experts[level](inputs[tasks]))
        experts = torch.cat(outs, dim=1)
        units = tasks if level == levels - 1 or not shared else tasks + 1
        fused = []
        for i in range(units):
            if i < tasks:
                gate, native = model.task_gates[level][i], model.natives[level][i]
            else:
                gate, native = model.shared_gates[level], model.shared_natives[level]
            g = torch.softmax(gate.linear(inputs[i]), dim=-1).clone()
            start = sum(counts[:i])
            g[:, start : start + counts[i]] += native_weights(native, counts[i])
            fused.append(torch.einsum("be,bed->bd", g, experts))
        inputs = fused
    return torch.stack(inputs[:tasks], dim=1)


def tower_inputs(model, x: torch.Tensor) -> torch.Tensor:
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        tower.register_forward_hook(lambda _m, args, _out, i=i: seen.__setitem__(i, args[0]))
        for i, tower in enumerate(model.towers)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return torch.stack([seen[i] for i in range(len(model.towers))], dim=1)


@pytest.mark.parametrize(
    "params",
    [
        {"num_levels": 1, "task_experts": 1, "shared_experts": 0},
        {"num_levels": 3, "task_experts": 1, "shared_experts": 0},  # AdaTT-sp
        {"num_levels": 2, "task_experts": 2, "shared_experts": 0},
        {"num_levels": 2, "task_experts": 1, "shared_experts": 1},  # the defaults
        {"num_levels": 3, "task_experts": 2, "shared_experts": 2},
    ],
)
def test_matches_the_authors_rule(params):
    # before, the shared unit had no native term: 0.61 apart on the defaults
    torch.manual_seed(0)
    model = build(params)
    with torch.no_grad():  # learned native weights away from their 1/m start
        for module in model.modules():
            if type(module).__name__ == "NativeCombination" and module.weight is not None:
                module.weight.uniform_(-0.7, 0.7)
    x = torch.randn(9, 7, dtype=F64)
    with torch.no_grad():
        expected = restated(model, x)
    assert torch.allclose(tower_inputs(model, x), expected, atol=1e-12)

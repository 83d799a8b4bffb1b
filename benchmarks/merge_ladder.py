"""Merging quality ladder: every merging rule on eight task experts of one pre-trained CNN.

A proxy, on data available offline, of the 8-task CLIP table of task arithmetic (Ilharco et
al., arXiv:2212.04089), TIES (Yadav et al., arXiv:2306.01708) and AdaMerging (Yang et al.,
arXiv:2310.02575). As there, each task's classification head is fixed and only the shared
encoder is fine-tuned and merged:

1. pre-train a small CNN on a pretext split of Fashion-MNIST (10 classes);
2. per task, fit a linear head on the frozen pre-trained encoder's features of 200 training
   examples (about 20 per class) and fix it: the "zero-shot" head. CLIP's zero-shot heads see no
   image of the task, so they are weak and fine-tuning has much to add; a probe on all the
   task's data leaves little (we tried: the experts then gained 3 to 8 points on average, and
   task arithmetic with λ from validation stayed within 1.2 points of the pre-trained model);
3. fine-tune the encoder with that head frozen (Adam, lr 1e-4, cosine decay, batch 128, 400 steps
   or 8 epochs, whichever is fewer): the task's expert;
4. merge the eight expert encoders with each rule and test every task with its own head.

The tasks, data sizes and model are described in ``merge_tasks.py``. Reference rows: the
pre-trained encoder, each expert on its own task ("individual", the per-task upper bound) and
joint multi-task training (one encoder fine-tuned on all tasks' training data mixed, the heads
fixed, as many steps as the eight experts together). Rule rows:

- every data-free rule in the registry with its documented defaults (``slerp`` takes two models
  and is skipped; ``tall_masks`` and ``emr`` are tested as their papers do, with each task's mask
  (and EMR's rescaler) applied to the merged vector, i.e. one model per task, marked †);
- ``task_arithmetic`` and ``ties`` with λ chosen on the validation split (mean accuracy over the
  tasks) from a grid, as their papers tune it;
- the fitted rules with their defaults: ``fisher`` and ``regmean`` read unlabeled training
  inputs; ``adamerging_task`` / ``adamerging_layer`` and ``surgery`` read the unlabeled test
  inputs (batches of 16), as in the AdaMerging and Surgery papers; surgery is run on top of task
  arithmetic (λ on validation) and of layer-wise AdaMerging, as in the Surgery paper.

Pre-trained, head and expert tensors are cached as safetensors under ``--work-dir`` (one folder
per seed and settings, with a JSON manifest), so a rerun only merges and tests.

    python benchmarks/merge_ladder.py                       # the full ladder, seed 0
    python benchmarks/merge_ladder.py --seeds 0,1,2         # three seeds (docs/results.md)
    python benchmarks/merge_ladder.py --quick               # small subsets, a smoke run
    python benchmarks/merge_ladder.py --rules average,task_arithmetic,ties
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

import manytask.merge as mm
from manytask import registry
from manytask.atomic import write_json, write_with
from merge_tasks import (  # benchmarks/merge_tasks.py (this script's folder)
    SHORT,
    TASKS,
    Split,
    Suite,
    TaskModel,
    accuracy,
    build_suite,
    finetune,
    linear_probe,
    pretrain,
    task_model,
)

ROOT = Path(__file__).resolve().parents[1]
StateDict = dict[str, Tensor]

FULL = {
    "pretext": 20_000,  # Fashion-MNIST training images that pre-train the encoder
    "n_train": 10_000,  # training images per Fashion task (digit tasks: 1,000)
    "n_val": 1_000,  # validation images per Fashion task (digit tasks: 200)
    "n_test": 5_000,  # test images per Fashion task (digit tasks: 597)
    "pretrain_epochs": 3,
    "pretrain_lr": 1e-3,
    "probe_examples": 200,  # the first 200 training examples of a task fit its head
    "probe_steps": 200,
    "expert_steps": 400,  # at most; and at most expert_epochs passes over the task's data
    "expert_epochs": 8,
    "expert_lr": 1e-4,
    "batch": 128,
}
QUICK = {
    "pretext": 3_000,
    "n_train": 1_000,
    "n_val": 200,
    "n_test": 500,
    "pretrain_epochs": 2,
    "pretrain_lr": 1e-3,
    "probe_examples": 200,
    "probe_steps": 100,
    "expert_steps": 40,
    "expert_epochs": 8,
    "expert_lr": 1e-4,
    "batch": 128,
}
# what the fitted rules are given beyond their defaults: Fisher's exact expectation costs one
# per-example backward pass per class, so the full run averages it over 1,024 examples per task
# (the default, 4,096, would take about 8 minutes here); --quick cuts every rule short
FULL_FITTED: dict[str, dict[str, Any]] = {"fisher": {"num_examples": 1024}}
QUICK_FITTED: dict[str, dict[str, Any]] = {
    "fisher": {"num_examples": 64},
    "regmean": {"num_examples": 200},
    "adamerging_task": {"steps": 20},
    "adamerging_layer": {"steps": 20},
    "surgery": {"steps": 20},
}
TA_GRID = [round(0.05 * i, 2) for i in range(1, 21)]  # task arithmetic paper: 0.05 … 1.0
TIES_GRID = [round(0.1 * i, 1) for i in range(1, 21)]  # 0.1 … 2.0 (TIES default 1.0 inside)
ADAPTIVE_BATCH = 16  # AdaMerging's and Surgery's batch of unlabeled test inputs (authors' code)
DATA_BATCH = 64  # batch of the training inputs that Fisher and RegMean read


# ---------------------------------------------------------------------------------------------
# experts (cached)


@dataclass
class Experts:
    """The pre-trained encoder, the fixed heads, the expert encoders and the joint encoder."""

    base: StateDict
    heads: list[StateDict]
    experts: list[StateDict]
    joint: StateDict
    train_seconds: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)


def _digest(settings: dict[str, Any], seed: int) -> str:
    text = json.dumps({"settings": settings, "seed": seed, "tasks": TASKS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _save(path: Path, tensors: StateDict) -> None:
    write_with(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


def load_or_train(suite: Suite, settings: dict[str, Any], seed: int, work: Path) -> Experts:
    """The experts of ``seed``: read from ``work/seed<seed>-<digest>/`` when its manifest holds
    the same settings, else trained and written there (the manifest last)."""
    folder = work / f"seed{seed}-{_digest(settings, seed)}"
    manifest = folder / "manifest.json"
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved.get("settings") == settings and saved.get("tasks") == list(TASKS):
            print(f"seed {seed}: reusing the models in {folder}", flush=True)
            return Experts(
                base=load_file(folder / "pretrained.safetensors"),
                heads=[load_file(folder / f"head-{t}.safetensors") for t in TASKS],
                experts=[load_file(folder / f"expert-{t}.safetensors") for t in TASKS],
                joint=load_file(folder / "joint.safetensors"),
                train_seconds=saved.get("train_seconds", {}),
                steps=saved.get("steps", {}),
            )
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    base = pretrain(
        suite.pretext, settings["pretrain_epochs"], settings["pretrain_lr"], settings["batch"], seed
    )
    seconds["pretrain"] = time.perf_counter() - started
    print(f"seed {seed}: pre-trained in {seconds['pretrain']:.0f} s", flush=True)
    started = time.perf_counter()
    few = settings["probe_examples"]
    heads = [
        linear_probe(
            base, Split(t.train.x[:few], t.train.y[:few]), t.classes, settings["probe_steps"], seed
        )
        for t in suite.tasks
    ]
    seconds["heads"] = time.perf_counter() - started
    experts = []
    steps = []
    for task, head in zip(suite.tasks, heads, strict=True):
        started = time.perf_counter()
        epochs_cap = -(-settings["expert_epochs"] * len(task.train) // settings["batch"])
        steps.append(min(settings["expert_steps"], epochs_cap))
        experts.append(
            finetune(
                base,
                [head],
                [task.train],
                steps[-1],
                settings["expert_lr"],
                settings["batch"],
                seed,
            )
        )
        seconds[f"expert/{task.name}"] = time.perf_counter() - started
        print(
            f"seed {seed}: expert {task.name} ({steps[-1]} steps) in "
            f"{seconds[f'expert/{task.name}']:.0f} s",
            flush=True,
        )
    started = time.perf_counter()
    # one encoder on all tasks' data mixed, as many steps as the experts together
    joint = finetune(
        base,
        heads,
        [t.train for t in suite.tasks],
        sum(steps),
        settings["expert_lr"],
        settings["batch"],
        seed,
    )
    seconds["joint"] = time.perf_counter() - started
    print(f"seed {seed}: joint model in {seconds['joint']:.0f} s", flush=True)
    step_counts = {**dict(zip(TASKS, steps, strict=True)), "joint": sum(steps)}
    _save(folder / "pretrained.safetensors", base)
    for name, head, expert in zip(TASKS, heads, experts, strict=True):
        _save(folder / f"head-{name}.safetensors", head)
        _save(folder / f"expert-{name}.safetensors", expert)
    _save(folder / "joint.safetensors", joint)
    write_json(
        manifest,
        {
            "settings": settings,
            "seed": seed,
            "tasks": list(TASKS),
            "steps": step_counts,
            "train_seconds": seconds,
        },
    )
    return Experts(base, heads, experts, joint, seconds, step_counts)


# ---------------------------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class Row:
    """One row of the ladder: ``id`` (unique), the registered ``rule`` it runs (None for the
    reference rows) and its kind."""

    id: str
    rule: str | None
    kind: str
    note: str = ""


REFERENCE = [
    Row("pretrained", None, "reference", "pre-trained encoder, fixed heads"),
    Row("individual", None, "reference", "each task's own expert (upper bound)"),
    Row("joint", None, "reference", "one encoder trained on all tasks' data"),
]
PER_TASK = {"tall_masks", "emr"}  # rules whose papers test one masked model per task
# the merged encoders Surgery is trained on (the Surgery paper's task arithmetic and AdaMerging)
SURGERY_ON = ("task_arithmetic", "adamerging_layer")
FITTED_ORDER = ["fisher", "regmean", "adamerging_task", "adamerging_layer", "surgery"]


def rule_rows() -> tuple[list[Row], list[dict[str, str]]]:
    """The rule rows for every registered rule, and the rules skipped with the reason."""
    rows: list[Row] = []
    skipped: list[dict[str, str]] = []
    fitted: list[Row] = []
    for entry in registry.entries("merge_rule"):
        if getattr(entry.obj, "fitted", False):
            if entry.name == "surgery":
                fitted += [
                    Row(f"surgery+{under}", "surgery", "data-driven", f"on {under}")
                    for under in SURGERY_ON
                ]
            else:
                fitted.append(Row(entry.name, entry.name, "data-driven"))
            continue
        most = getattr(entry.obj, "max_models", None)
        if most is not None and most < len(TASKS):
            skipped.append({"rule": entry.name, "why": f"takes at most {most} models"})
            continue
        note = "one masked model per task" if entry.name in PER_TASK else ""
        rows.append(Row(entry.name, entry.name, "data-free", note))
        if entry.name in ("task_arithmetic", "ties"):
            rows.append(
                Row(f"{entry.name}+val", entry.name, "data-free + val λ", "λ from validation")
            )
    fitted.sort(key=lambda r: FITTED_ORDER.index(r.rule) if r.rule in FITTED_ORDER else 99)
    return rows + fitted, skipped


def selected(rows: list[Row], wanted: set[str] | None) -> list[Row]:
    """The rows whose id or rule is in ``wanted`` (all when None); an unknown name is an error."""
    if wanted is None:
        return rows
    known = {r.id for r in rows} | {r.rule for r in rows if r.rule}
    unknown = wanted - known
    if unknown:
        raise SystemExit(
            f"unknown --rules {sorted(unknown)}; choose from {', '.join(sorted(known))}"
        )
    return [r for r in rows if r.id in wanted or r.rule in wanted]


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(
    predictors: Sequence[Callable[[Tensor], Tensor]], splits: Sequence[Split]
) -> list[float]:
    return [accuracy(p, s) for p, s in zip(predictors, splits, strict=True)]


def models_for(encoders: Sequence[StateDict], heads: Sequence[StateDict]) -> list[TaskModel]:
    return [task_model(e, h) for e, h in zip(encoders, heads, strict=True)]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


class Ladder:
    """Runs the rows of one seed: merges, then tests every task with its own head."""

    def __init__(self, suite: Suite, ex: Experts, seed: int, quick: bool) -> None:
        self.suite = suite
        self.ex = ex
        self.seed = seed
        self.quick = quick
        self.val = [t.val for t in suite.tasks]
        self.test = [t.test for t in suite.tasks]
        self.merged: dict[str, StateDict] = {}  # by row id, for rows that others build on
        self.chosen: dict[str, Any] = {}

    # data for the fitted rules ------------------------------------------------------------
    def train_inputs(self) -> list[list[Tensor]]:
        return [
            [t.train.x[i : i + DATA_BATCH] for i in range(0, len(t.train), DATA_BATCH)]
            for t in self.suite.tasks
        ]

    def test_inputs(self) -> list[list[Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for t in self.suite.tasks:
            x = t.test.x[torch.randperm(len(t.test), generator=gen)]
            out.append([x[i : i + ADAPTIVE_BATCH] for i in range(0, len(x), ADAPTIVE_BATCH)])
        return out

    def factory(self, task: int) -> TaskModel:
        model = TaskModel(self.suite.tasks[task].classes)
        model.load_state_dict(self.ex.heads[task], strict=False)
        return model

    def fitted_params(self, rule: str) -> dict[str, Any]:
        return dict((QUICK_FITTED if self.quick else FULL_FITTED).get(rule, {}))

    # one row -------------------------------------------------------------------------------
    def run(self, row: Row) -> dict[str, Any]:
        """Accuracies and details of ``row``: ``{"test": [...], "params": ..., ...}``."""
        ex, heads = self.ex, self.ex.heads
        if row.id == "pretrained":
            return {"test": evaluate(models_for([ex.base] * len(TASKS), heads), self.test)}
        if row.id == "individual":
            return {"test": evaluate(models_for(ex.experts, heads), self.test)}
        if row.id == "joint":
            return {"test": evaluate(models_for([ex.joint] * len(TASKS), heads), self.test)}
        assert row.rule is not None
        if row.id.endswith("+val"):
            return self.tuned(row.rule)
        if row.rule in PER_TASK:
            return self.per_task(row.rule)
        if row.kind == "data-driven":
            return self.fitted(row)
        rule = registry.call_with_params("merge_rule", row.rule, {})
        merged = mm.merge_state_dicts(ex.base, ex.experts, rule, seed=self.seed)
        out: dict[str, Any] = {"test": self.single(merged), "params": "defaults"}
        if rule.summary():
            out["summary"] = rule.summary()
        return out

    def single(self, encoder: StateDict, splits: Sequence[Split] | None = None) -> list[float]:
        """Accuracy of one merged encoder on every task (test split unless ``splits``)."""
        return evaluate(models_for([encoder] * len(TASKS), self.ex.heads), splits or self.test)

    def tuned(self, rule: str) -> dict[str, Any]:
        """λ from the grid that maximises the mean validation accuracy."""
        grid = TA_GRID if rule == "task_arithmetic" else TIES_GRID
        curve = {}
        for scale in grid:
            merged = mm.merge_state_dicts(
                self.ex.base, self.ex.experts, rule, params={"scale": scale}, seed=self.seed
            )
            curve[scale] = mean(self.single(merged, self.val))
        best = max(grid, key=lambda s: (curve[s], -s))
        merged = mm.merge_state_dicts(
            self.ex.base, self.ex.experts, rule, params={"scale": best}, seed=self.seed
        )
        self.merged[f"{rule}+val"] = merged
        self.chosen[rule] = best
        return {
            "test": self.single(merged),
            "params": {"scale": best},
            "val_curve": {str(k): v for k, v in curve.items()},
        }

    def per_task(self, name: str) -> dict[str, Any]:
        """TALL masks / EMR: task t's model is θ₀ + (λ_t) m_t ⊙ τ (τ the merged vector)."""
        rule = registry.call_with_params("merge_rule", name, {})
        extras: dict[str, StateDict] = {}
        merged = mm.merge_state_dicts(self.ex.base, self.ex.experts, rule, extras=extras)
        scales = rule.summary().get("rescalers", [1.0] * len(TASKS))
        encoders = []
        for t in range(len(TASKS)):
            masks = extras[f"mask/{t}"]
            encoders.append(
                {
                    k: self.ex.base[k] + scales[t] * masks[k].to(v.dtype) * (v - self.ex.base[k])
                    for k, v in merged.items()
                }
            )
        out: dict[str, Any] = {
            "test": evaluate(models_for(encoders, self.ex.heads), self.test),
            "params": "defaults",
            "single_model_test": self.single(merged),
        }
        if rule.summary():
            out["summary"] = rule.summary()
        return out

    def fitted(self, row: Row) -> dict[str, Any]:
        assert row.rule is not None
        params = self.fitted_params(row.rule)
        if row.rule in ("fisher", "regmean"):
            rule = registry.call_with_params("merge_rule", row.rule, params)
            merged = rule.fit(self.factory, self.ex.experts, self.train_inputs(), seed=self.seed)
            return {
                "test": self.single(merged),
                "params": params or "defaults",
                "data": "unlabeled training inputs",
            }
        if row.rule.startswith("adamerging"):
            merged = self.adamerging(row.rule)
            out: dict[str, Any] = {
                "test": self.single(merged),
                "params": params or "defaults",
                "data": "unlabeled test inputs",
            }
            out["summary"] = self.chosen.get(row.rule, {})
            return out
        # surgery on a merged encoder another row computes
        inner = row.id.split("+", 1)[1]
        # task arithmetic with λ from validation, or AdaMerging
        under = self.tuned_merge(inner) if inner == "task_arithmetic" else self.adamerging(inner)
        rule = registry.call_with_params("merge_rule", "surgery", params)
        model = rule.fit(
            self.factory, self.ex.experts, self.test_inputs(), seed=self.seed, merged=under
        )
        predictors = [_task_predictor(model, t) for t in range(len(TASKS))]
        summary = rule.summary()
        return {
            "test": evaluate(predictors, self.test),
            "params": params or "defaults",
            "data": "unlabeled test inputs",
            "summary": {k: summary[k] for k in ("l1_first_step", "l1_last_step") if k in summary},
        }

    def tuned_merge(self, rule: str) -> StateDict:
        if f"{rule}+val" not in self.merged:
            self.tuned(rule)
        return self.merged[f"{rule}+val"]

    def adamerging(self, rule: str) -> StateDict:
        if rule not in self.merged:
            fit = registry.call_with_params("merge_rule", rule, self.fitted_params(rule))
            self.merged[rule] = fit.fit(
                self.factory, self.ex.experts, self.test_inputs(), base=self.ex.base, seed=self.seed
            )
            summary = fit.summary()
            entropy = summary.get("entropy", [])
            self.chosen[rule] = {
                "entropy_first": entropy[0] if entropy else None,
                "entropy_last": entropy[-1] if entropy else None,
                "coefficients": summary.get("coefficients")
                if rule == "adamerging_task"
                else "one per tensor and task (see layers)",
            }
        return self.merged[rule]


def _task_predictor(model: torch.nn.Module, task: int) -> Callable[[Tensor], Tensor]:
    def predict(x: Tensor) -> Tensor:
        out: Tensor = model(x, task=task)
        return out

    return predict


# ---------------------------------------------------------------------------------------------
# table


def _pct(values: Sequence[float]) -> str:
    m = 100 * mean(values)
    if len(values) < 2:
        return f"{m:.1f}"
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}"


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per-task test accuracy (%, mean over seeds), the average and the normalised
    average (merged / individual per task, then averaged), ± sample std over seeds."""
    head = ["method", "kind", *(SHORT[t] for t in TASKS), "avg", "norm. avg"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(TASKS) + 2)]
    for r in results:
        runs = r["runs"]
        per_task = [100 * mean([run["test"][i] for run in runs]) for i in range(len(TASKS))]
        name = r["id"] + (" †" if r["rule"] in PER_TASK else "")
        cells = [
            f"`{name}`",
            r["kind"],
            *(f"{v:.1f}" for v in per_task),
            _pct([run["avg"] for run in runs]),
            _pct([run["normalized"] for run in runs]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subsets (a smoke run)")
    parser.add_argument(
        "--work-dir",
        default=str(ROOT / "runs" / "merge_ladder"),
        help="cache of the trained models",
    )
    parser.add_argument("--rules", help="comma-separated rule names or row ids (default: all)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: robust on a shared machine)",
    )
    parser.add_argument(
        "--out",
        help="JSON output (default benchmarks/results/merge_ladder"
        ".json; with --quick, merge_ladder_quick.json in --work-dir)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wanted = {s.strip() for s in args.rules.split(",") if s.strip()} if args.rules else None
    default_out = (
        Path(args.work_dir) / "merge_ladder_quick.json"
        if args.quick
        else ROOT / "benchmarks" / "results" / "merge_ladder.json"
    )
    out = Path(args.out) if args.out else default_out
    candidates, skipped = rule_rows()
    rows = REFERENCE + selected(candidates, wanted)
    started = time.perf_counter()
    suite = build_suite(
        settings["pretext"], settings["n_train"], settings["n_val"], settings["n_test"]
    )
    data_seconds = time.perf_counter() - started
    results = [
        {"id": r.id, "rule": r.rule, "kind": r.kind, "note": r.note, "runs": []} for r in rows
    ]
    train_seconds = {}
    train_steps = {}
    for seed in seeds:
        ex = load_or_train(suite, settings, seed, Path(args.work_dir))
        train_seconds[str(seed)] = ex.train_seconds
        train_steps[str(seed)] = ex.steps
        ladder = Ladder(suite, ex, seed, args.quick)
        runs = []
        for row, result in zip(rows, results, strict=True):
            begun = time.perf_counter()
            run = ladder.run(row)
            run["seconds"] = time.perf_counter() - begun
            run["avg"] = mean(run["test"])
            run["seed"] = seed
            result["runs"].append(run)
            runs.append(run)
            print(
                f"seed {seed}: {row.id:28s} avg {100 * run['avg']:5.1f}  ({run['seconds']:.1f} s)",
                flush=True,
            )
        individual = runs[1]["test"]  # REFERENCE[1]
        for run in runs:
            run["normalized"] = mean([a / b for a, b in zip(run["test"], individual, strict=True)])
    total = time.perf_counter() - started
    text = table(results)
    print()
    print(text)
    if skipped:
        print("\nskipped: " + "; ".join(f"{s['rule']} ({s['why']})" for s in skipped))
    write_json(
        out,
        {
            "benchmark": "merge_ladder",
            "command": "python benchmarks/merge_ladder.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "settings": settings,
            "seeds": seeds,
            "tasks": list(TASKS),
            "sizes": suite.sizes(),
            "pixel_mean": suite.pixel_mean,
            "pixel_std": suite.pixel_std,
            "ta_grid": TA_GRID,
            "ties_grid": TIES_GRID,
            "skipped": skipped,
            "rows": results,
            "table": text,
            "train_steps": train_steps,
            "seconds": {"data": data_seconds, "train": train_seconds, "total": total},
            "environment": {
                "torch": torch.__version__,
                "threads": args.threads,
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
        },
    )
    print(f"\nwrote {out} ({total:.0f} s)")


if __name__ == "__main__":
    main()

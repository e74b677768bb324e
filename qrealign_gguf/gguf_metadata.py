"""--metadata overrides: JSON values turned into the GGUF values llama.cpp expects, or refused before any work.

llama.cpp's loader reads each key with a fixed type and throws "key ... has wrong type" for any other, so a value
must be written in the type llama.cpp reads. Where that type comes from:

  1. a key the model family already wrote (llama.context_length, tokenizer.ggml.tokens, ...): the same GGUF type
     (arrays: same item type and length: a vocabulary-sized array must stay vocabulary-sized). gguf-py's
     GGUFWriter would otherwise replace the value AND its type with only a logged warning;
  2. a key gguf-py's writer has an add_* method for (general.license, <arch>.rope.scaling.factor, ...): the type
     that method writes, found by calling each one-argument add_* method on a scratch writer;
  3. any other key: inferred from the JSON value (bool, int -> UINT32 / INT64, float -> FLOAT32, string, array).

Refused outright: keys that are not plain dotted ASCII names; null, objects, nested or empty or mixed arrays,
non-finite floats, integers out of the type's range; and keys whose
value the conversion itself determines: general.architecture (must be the family's), general.alignment,
general.file_type, general.quantization_version, general.quantized_by, split.* (the shard layout) and qrealign.*
(our provenance: an override must not be able to forge "realigned").
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Any

import gguf
from gguf import GGUFValueType as V
from gguf.gguf_writer import GGUFValue

from .errors import InputError

_KEY = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_MAX_KEY = 256
_DERIVED = {"general.alignment": "the data alignment of the written file",
            "general.file_type": "the --outtype", "general.quantization_version": "the quantizer",
            "general.quantized_by": "the tool that wrote the file (provenance)"}
_DERIVED_PREFIXES = {"split.": "the shard layout (--split-max-size)",
                     "qrealign.": "qrealign-gguf's provenance, which an override must not forge"}
_INT_RANGE = {V.UINT8: (0, 2**8 - 1), V.INT8: (-2**7, 2**7 - 1), V.UINT16: (0, 2**16 - 1), V.INT16: (-2**15, 2**15 - 1),
              V.UINT32: (0, 2**32 - 1), V.INT32: (-2**31, 2**31 - 1), V.UINT64: (0, 2**64 - 1),
              V.INT64: (-2**63, 2**63 - 1)}
_F32_MAX = 3.4028234663852886e38


def check_override(key: Any, val: Any) -> None:
    """Everything that can be refused without knowing the model (load time); InputError says what and how to fix."""
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY or not _KEY.fullmatch(key):
        raise InputError(f"metadata key {key!r} is not a GGUF key: use dotted ASCII names like general.name "
                         "(letters, digits, _ and -, no spaces)")
    if key in _DERIVED:
        raise InputError(f"metadata key {key} cannot be overridden: it is set by {_DERIVED[key]}")
    for prefix, why in _DERIVED_PREFIXES.items():
        if key.startswith(prefix):
            raise InputError(f"metadata key {key} cannot be overridden: {prefix}* is {why}")
    if key == "general.architecture" and not isinstance(val, str):
        raise InputError(f"metadata key general.architecture must be the model's architecture string, not {val!r}")
    gguf_value(key, val, arch=_arch_of(key), written=None)


def gguf_value(key: str, val: Any, arch: str, written: GGUFValue | None, n_vocab: int | None = None) -> GGUFValue:
    """The GGUF value to write for an override (see the module doc for where its type comes from); token ids
    (tokenizer.ggml.*_token_id) must lie inside the vocabulary when its size n_vocab is known."""
    expected = {written.type} if written is not None else writer_key_types(arch).get(key)
    if isinstance(val, list):
        if expected is not None and V.ARRAY not in expected:
            raise InputError(f"metadata key {key} must be a {_names(expected)}, not an array")
        sub, items = _array(key, val)
        if written is not None:
            _same_array(key, sub, items, written)
        return GGUFValue(items, V.ARRAY, sub)
    scalar = sorted(t for t in expected or () if t != V.ARRAY)
    if expected is not None and not scalar:
        raise InputError(f"metadata key {key} must be an array, not {val!r}")
    target = scalar[0] if scalar else _inferred(key, val)
    value = _scalar(key, val, target)
    if key.endswith("_token_id") and n_vocab is not None and not 0 <= value < n_vocab:
        raise InputError(f"metadata key {key}: token id {value} is outside this model's vocabulary (0..{n_vocab - 1})")
    return GGUFValue(value, target, None)


def writer_key_types(arch: str) -> dict[str, set[V]]:
    """Key -> the GGUF type(s) gguf-py's GGUFWriter writes it as, for the keys its one-argument add_* methods
    write (general.*, tokenizer.*, <arch>.*). Computed, not tabled, so it follows the installed gguf-py."""
    types: dict[str, set[V]] = {}
    methods = [f for name, f in inspect.getmembers(gguf.GGUFWriter, inspect.isfunction) if name.startswith("add_")]
    for sample in (1, [1], "x"):  # a method accepting an int and a list writes a scalar or a per-layer array
        w = gguf.GGUFWriter(None, arch=arch)
        for fn in methods:
            params = list(inspect.signature(fn).parameters.values())[1:]
            if sum(p.default is p.empty and p.kind == p.POSITIONAL_OR_KEYWORD for p in params) != 1:
                continue
            w.kv_data[0].clear()
            try:
                fn(w, sample)
            except Exception:  # noqa: BLE001 - the method wants another kind of argument: not this sample
                continue
            for k, v in w.kv_data[0].items():
                types.setdefault(k, set()).add(v.type)
    return types


def _arch_of(key: str) -> str:
    """The architecture a key's first segment names (llama.context_length -> llama); llama for general.* etc."""
    head = key.split(".", 1)[0]
    return head if head in gguf.MODEL_ARCH_NAMES.values() else "llama"


def _names(types: set[V]) -> str:
    return " or ".join(sorted(t.name for t in types))


def _inferred(key: str, val: Any) -> V:
    if isinstance(val, bool):
        return V.BOOL
    if isinstance(val, int):
        return V.UINT32 if 0 <= val <= 2**32 - 1 else V.INT64
    if isinstance(val, float):
        return V.FLOAT32
    if isinstance(val, str):
        return V.STRING
    raise InputError(f"metadata key {key}: value {val!r} has no GGUF type (use a string, number, bool or a "
                     "non-empty list of one of those)")


def _scalar(key: str, val: Any, target: V) -> Any:
    """val checked and converted for a GGUF scalar type (ints may become floats, never the other way)."""
    what = f"metadata key {key} must be a {target.name}"
    if target == V.BOOL:
        if not isinstance(val, bool):
            raise InputError(f"{what} (true or false), not {val!r}")
        return val
    if target == V.STRING:  # an empty one is written as such (gguf-py's add_string would silently drop it)
        if not isinstance(val, str):
            raise InputError(f"{what} (a string), not {val!r}")
        return val
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise InputError(f"{what}, not {val!r}")
    if target in _INT_RANGE:
        lo, hi = _INT_RANGE[target]
        if not isinstance(val, int):
            raise InputError(f"{what} (an integer), not {val!r}")
        if not lo <= val <= hi:
            raise InputError(f"{what}: {val} is outside {lo}..{hi}")
        return val
    if not math.isfinite(val):
        raise InputError(f"{what}: {val} is not a finite number")
    if target == V.FLOAT32 and abs(val) > _F32_MAX:
        raise InputError(f"{what}: {val} does not fit a 32-bit float")
    return float(val)


def _array(key: str, items: list) -> tuple[V, list]:
    """(item type, converted items) of a JSON list: non-empty, one type (ints and floats together: floats)."""
    if not items:
        raise InputError(f"metadata key {key}: an empty array cannot be written (gguf-py drops it); leave it out")
    kinds = {_kind(v) for v in items}
    if len(kinds) != 1 or None in kinds:
        raise InputError(f"metadata key {key}: an array's items must all be strings, all numbers or all bools "
                         f"(no nested arrays, objects or null), got {items[:4]!r}")
    kind = kinds.pop()
    if kind != "number":
        sub = V.BOOL if kind == "bool" else V.STRING
    elif any(isinstance(v, float) for v in items):
        sub = V.FLOAT32
    else:
        sub = V.INT32 if all(-2**31 <= v < 2**31 for v in items) else V.INT64
    return sub, [_scalar(f"{key}[{i}]", v, sub) for i, v in enumerate(items)]


def _kind(v: Any) -> str | None:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return "string" if isinstance(v, str) else None


def _same_array(key: str, sub: V, items: list, written: GGUFValue) -> None:
    """An override of an array the family wrote keeps its item type and length."""
    old = list(written.value)
    try:
        old_sub = written.sub_type or V.get_type(old[0])
    except (ValueError, IndexError):
        old_sub = sub
    if old_sub != sub or len(old) != len(items):
        raise InputError(f"metadata key {key}: this model's value is an array of {len(old)} {old_sub.name}, the "
                         f"override is {len(items)} {sub.name}; an override must keep both")

"""Which GGUF type each tensor gets: llama-quantize's per-tensor mix rules, plus its shape fallbacks.

`--outtype` names follow llama.cpp: plain types (Q8_0, Q4_0, ...) and the K-quant mixes (Q4_K_M, ...);
bare K names are llama-quantize's aliases (Q4_K = Q4_K_M, Q3_K = Q3_K_M, Q5_K = Q5_K_M, Q2_K = the Q2_K mix).
qrealign's own: QR4_KO (every block matrix in the custom QR4_KO type) and QR4_K_M / QR5_K_M, which are Q4_K_M /
Q5_K_M except where a row is a multiple of 128 but not of 256: there Q4_K and Q5_K become the custom QR5_K128
instead of llama.cpp's Q5_0 / Q5_1 fallback (docs/BENCHMARKS.md, "QR5_K128").
Rules are keyed by GGUF tensor name and layer index, so they hold for every family. MoE/70B/falcon special
cases of upstream do not apply to the families we convert.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import InputError
from .formats.types import QType, qtype
from .hf_model import HFModel
from .models import family_for
from .models.base import ModelFamily, TensorSource

# outtype -> (base ggml type, mix name or None for "every matrix this type")
OUTTYPES: dict[str, tuple[str, str | None]] = {
    "F32": ("F32", None), "F16": ("F16", None), "BF16": ("BF16", None),
    "Q8_0": ("Q8_0", "Q8_0"), "Q4_0": ("Q4_0", "Q4_0"), "Q4_1": ("Q4_1", "Q4_1"),
    "Q5_0": ("Q5_0", "Q5_0"), "Q5_1": ("Q5_1", "Q5_1"),
    "Q2_K": ("Q2_K", "Q2_K"), "Q3_K_S": ("Q3_K", "Q3_K_S"), "Q3_K_M": ("Q3_K", "Q3_K_M"), "Q3_K_L": ("Q3_K", "Q3_K_L"),
    "Q4_K_S": ("Q4_K", "Q4_K_S"), "Q4_K_M": ("Q4_K", "Q4_K_M"), "Q5_K_S": ("Q5_K", "Q5_K_S"),
    "Q5_K_M": ("Q5_K", "Q5_K_M"), "Q6_K": ("Q6_K", "Q6_K"),
    # qrealign's custom type (formats/types.py): runs only in llama.cpp with native/llama_patches applied
    "QR4_KO": ("QR4_KO", "QR4_KO"),
    "QR4_K_M": ("Q4_K", "Q4_K_M"), "QR5_K_M": ("Q5_K", "Q5_K_M"),  # + QR5_K128 where K blocks do not fit
}
# outtypes whose K-quants fall back to QR5_K128 (not Q5_0 / Q5_1) on rows a multiple of 128 but not of 256
K128_FALLBACK = {"QR4_K_M", "QR5_K_M"}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
# llama_ftype values written to general.file_type (llama.h)
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
             "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
             "Q5_K_M": 17, "Q6_K": 18, "BF16": 32,
             "QR4_KO": 240,  # ours: LLAMA_FTYPE_MOSTLY_QR4_KO in the patched llama.h (same number as the type id)
             "QR4_K_M": 15, "QR5_K_M": 17}  # the mixes they are (llama.cpp prints "Q4_K - Medium" / ...)
# shape fallback when a row is not a multiple of the block size (llama-quant.cpp tensor_type_fallback)
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
            "QR4_KO": "Q5_0"}  # as Q4_K


def resolve_outtype(name: str) -> str:
    """Canonical outtype name; ValueError lists the valid ones."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in OUTTYPES:
        raise ValueError(f"unknown --outtype {name!r}; choose one of {', '.join([*OUTTYPES, *ALIASES])}")
    return key


@dataclass(frozen=True)
class PlanInput:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # row-major; cols = shape[-1]


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for cat in ("attn_qkv", "attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{cat}.weight" in name:
            return cat
    for cat in ("ffn_up", "ffn_gate", "ffn_down"):
        if cat in name:
            return cat
    return "other"


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama-quantize quantizes 2-D+ '*weight' tensors except norms (and a few arch-specific tables)."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def _mix_type(mix: str, base: str, cat: str, name: str, cols: int, n_layer: int, n_gqa: int,
              tied: bool, has_imatrix: bool) -> str:
    """llama_tensor_get_type_impl for the mixes we offer (non-MoE, non-falcon)."""
    if mix == "QR4_KO":  # a pure mix of our custom type; token_embd / output as Q4_K_M would have them
        if cat in ("output", "token_embd"):
            return _mix_type("Q4_K_M", "Q4_K", cat, name, cols, n_layer, n_gqa, tied, has_imatrix)
        return base
    i = _layer(name)
    if cat == "output" or (tied and cat == "token_embd"):
        blk = qtype(base).block_size
        if cols % blk != 0:
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"
    if cat == "token_embd":
        return base
    if cat in ("attn_v", "attn_qkv"):
        if mix == "Q2_K":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if mix == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if mix == "Q3_K_L":
            return "Q5_K"
        if mix in ("Q4_K_M", "Q5_K_M") and _more_bits(i, n_layer):
            return "Q6_K"
        if mix == "Q4_K_S" and i < 4:
            return "Q5_K"
        return base
    if cat == "ffn_down":
        if mix == "Q2_K":
            return "Q3_K"
        if mix == "Q3_K_M":
            return "Q5_K" if i < n_layer // 16 else "Q4_K"
        if mix == "Q3_K_L":
            return "Q5_K"
        if mix == "Q4_K_M":
            return "Q6_K" if _more_bits(i, n_layer) else base
        if mix == "Q5_K_M" and _more_bits(i, n_layer):
            return "Q6_K"
        if mix == "Q4_K_S" and i < n_layer // 8:
            return "Q5_K"
        if mix in ("Q4_0", "Q5_0") and has_imatrix and i < n_layer // 8:
            return "Q4_1" if mix == "Q4_0" else "Q5_1"
        return base
    if cat == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, base)
    return base


def shape_fallback(t: str, cols: int, k128: bool = False) -> str:
    """Demote a type whose block does not divide the row length (then F16 if even that fails). k128: Q4_K and
    Q5_K become QR5_K128 where its 128-weight blocks fit."""
    if cols % qtype(t).block_size == 0:
        return t
    if k128 and t in ("Q4_K", "Q5_K") and cols % qtype("QR5_K128").block_size == 0:
        return "QR5_K128"
    t = FALLBACK.get(t, t)
    return t if cols % qtype(t).block_size == 0 else "F16"


def plan_types(outtype: str, tensors: list[PlanInput], n_layer: int, n_head: int, n_head_kv: int,
               has_imatrix: bool = False, pure: bool = False) -> dict[str, QType]:
    """GGUF type for every tensor. 1-D and norm tensors stay F32 (what llama.cpp expects)."""
    outtype = resolve_outtype(outtype)
    base, mix = OUTTYPES[outtype]
    tied = not any(t.name == "output.weight" for t in tensors)
    n_gqa = n_head // max(n_head_kv, 1)
    out: dict[str, QType] = {}
    for t in tensors:
        if not _quantizable(t.name, t.shape):
            out[t.name] = qtype("F32")
            continue
        if mix is None:  # float outtypes: matrices in that float type
            out[t.name] = qtype(base)
            continue
        chosen = base if pure else _mix_type(mix, base, _category(t.name), t.name, t.shape[-1], n_layer,
                                             n_gqa, tied, has_imatrix)
        out[t.name] = qtype(shape_fallback(chosen, t.shape[-1], k128=outtype in K128_FALLBACK))
    return out


# -- the plan of one conversion: every tensor's type and size, and the output name, before a byte is written ------
@dataclass
class PlannedTensor:
    source: TensorSource
    qtype: QType
    nbytes: int


@dataclass
class Plan:
    family: ModelFamily
    outtype: str
    tensors: list[PlannedTensor]
    output: Path

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.source.shape)) for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_bytes / max(self.n_params, 1)

    @property
    def custom_types(self) -> list[str]:
        """qrealign's own tensor types in this plan (only the patched llama.cpp runs the file)."""
        return sorted({t.qtype.name for t in self.tensors if t.qtype.custom})


def _nbytes(t: QType, shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * t.row_bytes(shape[-1])


def default_filename(family: ModelFamily, outtype: str, n_params: int, custom: bool) -> str:
    """<Name>-<Size>-<TYPE>.gguf (gguf-py's naming convention); the size is left out if the name has it.
    Files holding custom tensor types (QR4_KO, QR5_K128) end in .qrealign.gguf: the name says stock llama.cpp
    will not load them."""
    name = family.model.path.resolve().name
    size = gguf.size_label(n_params, 0, 0, 0)
    ext = ".qrealign.gguf" if custom else ".gguf"
    return f"{name}-{outtype}{ext}" if size.lower() in name.lower() else f"{name}-{size}-{outtype}{ext}"


def make_plan(model_dir: str | Path, output: str | Path, outtype: str = "Q8_0", *, pure: bool = False,
              has_imatrix: bool = False) -> Plan:
    """Everything decided and checked before a byte is written; `output` may be a directory (default name)."""
    try:
        outtype = resolve_outtype(outtype)
    except ValueError as e:
        raise InputError(str(e)) from None
    model = HFModel(model_dir)
    family = family_for(model)
    family.validate()
    sources = list(family.tensors())
    types = plan_types(outtype, [PlanInput(s.name, s.shape) for s in sources], n_layer=family.n_layers,
                       n_head=family.n_head, n_head_kv=family.n_head_kv, has_imatrix=has_imatrix, pure=pure)
    tensors = [PlannedTensor(s, types[s.name], _nbytes(types[s.name], s.shape)) for s in sources]
    out = Path(output)
    if out.is_dir():
        out = out / default_filename(family, outtype, sum(int(np.prod(s.shape)) for s in sources),
                                     custom=any(t.custom for t in types.values()))
    return Plan(family, outtype, tensors, out)

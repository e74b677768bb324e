"""What a model family must tell the converter. One subclass per family, one file each.

A family maps HF tensor names to GGUF names (via gguf-py's TensorNameMap), applies exact per-tensor
transforms llama.cpp expects (Q/K permutation for llama, +1 on gemma norms, ...), and writes the
hparams and tokenizer metadata llama.cpp needs. It knows nothing about quantization.
"""
from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import gguf
import numpy as np

from ..errors import InputError
from ..hf_model import FLOAT_DTYPES, HFModel, show
from .checks import check_raw_config, check_resolved, check_rope
from .config import read_text_config


@dataclass
class TensorSource:
    """One GGUF tensor to write, loaded lazily."""
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # row-major shape as written; for matrices (rows, cols), cols = ggml ne[0]
    load: Callable[[], np.ndarray]  # float32 values with every family transform applied
    hf_name: str = ""  # source tensor (for messages and imatrix lookup)
    # rows [r0, r1) of load()'s result without reading the rest, where the family's transform allows it (None
    # otherwise): the writer streams large tensors (token_embd, output) in row chunks to bound peak memory
    load_rows: Callable[[int, int], np.ndarray] | None = None

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) >= 2


class ModelFamily(ABC):
    arch: ClassVar[str]  # GGUF architecture name, e.g. "llama"
    hf_architectures: ClassVar[tuple[str, ...]]  # config.json "architectures" values handled

    def __init__(self, model: HFModel) -> None:
        self.model = model

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg("num_hidden_layers", "n_layers"))

    @property
    def n_head(self) -> int:
        return int(self.model.cfg("num_attention_heads"))

    @property
    def n_head_kv(self) -> int:
        return int(self.model.cfg("num_key_value_heads", "num_attention_heads"))

    def transform(self, name: str, x: np.ndarray) -> np.ndarray:
        """Exact value changes llama.cpp's graph expects for GGUF tensor `name` (identity by default)."""
        return x

    @abstractmethod
    def add_metadata(self, w: gguf.GGUFWriter) -> None:
        """Write general.*, <arch>.* hparams and tokenizer.* keys."""

    @abstractmethod
    def tensors(self) -> Iterator[TensorSource]:
        """All tensors in file order, with GGUF names and transforms applied."""

    def validate(self) -> None:
        """Raise InputError for configs this family cannot convert faithfully (called before any work)."""


# Dimension names of the tensor shapes a family expects: DecoderFamily.dims() gives their values, and the
# names appear in the message when a tensor's shape disagrees with config.json.
H, FF, VOCAB, HD = "hidden_size", "intermediate_size", "vocab_size", "head_dim"
Q, KV = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# -- shared machinery for decoder-only transformer families ---------------------------------------------------
def permute_rotary(x: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary layout -> the interleaved pairs llama.cpp's "llama" rope (mode NORM) rotates.

    Within each head the rows are [x0..x(d/2-1), y0..y(d/2-1)]; llama.cpp wants [x0, y0, x1, y1, ...].
    Works for a weight (rows, cols) and for a bias (rows,).
    """
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors for rope_type "llama3" (upstream's rope_freqs.weight; llama.cpp divides theta by them)."""
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    lo, hi = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for f in freqs.astype(np.float64):
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


class DecoderFamily(ModelFamily):
    """A decoder-only HF transformer written tensor by tensor through gguf-py's TensorNameMap.

    Subclasses set gguf_arch and hook in with `transform` (per-tensor value changes), `extra_tensors`,
    `add_arch_metadata` and `check`. Hyperparameters come from config.read_text_config, which fills the defaults
    a config.json leaves out (common in Gemma 3 text_config) exactly as transformers' config classes do.
    """
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    rope_types: ClassVar[tuple[str, ...]] = ("default", "linear", "yarn")
    untied_output_ok: ClassVar[bool] = True  # does llama.cpp's arch read output.weight?
    activations: ClassVar[tuple[str, ...]] = ("silu",)
    skip_prefixes: ClassVar[tuple[str, ...]] = ()  # HF tensors that are not part of the text model

    def __init__(self, model: HFModel) -> None:
        super().__init__(model)
        # before the defaults are filled in: some configs would make us allocate per layer
        check_raw_config(model.config, model.text_config, len(model.tensor_names()))
        self.c = read_text_config(model.config)
        check_resolved(self.arch, n_layers=self.n_layers, n_embd=self.n_embd, n_head=self.n_head,
                       n_head_kv=self.n_head_kv, head_dim=self.head_dim,
                       # the default is hidden // heads; a nested text_config's class default is real
                       head_dim_given=(model.text_config.get("head_dim") is not None
                                       or model.text_config is not model.config),
                       n_ff=self.c.intermediate_size, vocab=self.vocab_size, n_ctx=self.c.max_position_embeddings,
                       eps=self.c.rms_norm_eps, layer_types=self.layer_types())
        self.tmap = gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)

    # -- hyperparameters --------------------------------------------------------------------------------------
    # (values as transformers resolved them; check_resolved refuses any that is not a positive integer)
    @property
    def n_layers(self) -> int:
        return self.c.num_hidden_layers

    @property
    def n_embd(self) -> int:
        return self.c.hidden_size

    @property
    def n_head(self) -> int:
        return self.c.num_attention_heads

    @property
    def n_head_kv(self) -> int:
        return self.c.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.c.head_dim

    @property
    def vocab_size(self) -> int:
        return self.c.vocab_size

    @property
    def tied(self) -> bool:
        return self.c.tie_word_embeddings

    def rope(self, layer_type: str = "full_attention") -> dict:
        """Rope settings for one attention kind, as a dict with rope_type, rope_theta, factor, ..."""
        return self.c.rope.get(layer_type) or self.c.rope.get("full_attention") or {"rope_type": "default"}

    def context_length(self) -> int:
        return int(self.c.max_position_embeddings)

    def layer_types(self) -> list[str]:
        return list(self.c.layer_types)

    # -- hooks --------------------------------------------------------------------------------------------------
    def transform(self, name: str, x: np.ndarray) -> np.ndarray:
        """Exact value changes llama.cpp's graph expects for GGUF tensor `name`."""
        return x

    def extra_tensors(self) -> Iterator[TensorSource]:
        return iter(())

    def add_arch_metadata(self, w: gguf.GGUFWriter) -> None:
        pass

    def check(self) -> None:
        """Family-specific InputErrors (called by validate)."""

    def dims(self) -> dict[str, int]:
        """Values of the dimension names used in layer_tensors / global_tensors."""
        return {H: self.n_embd, FF: self.c.intermediate_size, VOCAB: self.vocab_size, HD: self.head_dim,
                Q: self.n_head * self.head_dim, KV: self.n_head_kv * self.head_dim}

    def layer_tensors(self) -> dict[str, tuple[str, ...]]:
        """Every tensor one layer must have (name after "model.layers.N.") -> shape in dimension names; the
        llama layout, which families extend. What llama.cpp's loader requires for the arch, plus what HF's
        config says is there (biases), so that the file computes what transformers computes."""
        return {"input_layernorm.weight": (H,),
                "self_attn.q_proj.weight": (Q, H), "self_attn.k_proj.weight": (KV, H),
                "self_attn.v_proj.weight": (KV, H), "self_attn.o_proj.weight": (H, Q),
                "post_attention_layernorm.weight": (H,),
                "mlp.gate_proj.weight": (FF, H), "mlp.up_proj.weight": (FF, H), "mlp.down_proj.weight": (H, FF)}

    def global_tensors(self) -> dict[str, tuple[str, ...]]:
        """Tensors outside the layers (HF text names) -> shape; lm_head only where the output is untied."""
        out = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,)}
        return out if self.tied else {**out, "lm_head.weight": (VOCAB, H)}

    # -- ModelFamily -----------------------------------------------------------------------------------------
    def validate(self) -> None:
        for kind in sorted(set(self.layer_types())):
            check_rope(self.rope(kind), f"config.json rope settings of {kind} layers")
        act = self.c.activation
        if act not in self.activations:
            raise InputError(f"{self.model.architecture}: hidden activation {act!r} is not supported "
                             f"(llama.cpp's {self.arch} uses {'/'.join(self.activations)})")
        rt = self.rope().get("rope_type", "default")
        if rt not in self.rope_types:
            raise InputError(f"{self.model.architecture}: rope_type {rt!r} is not supported for {self.arch} "
                             f"(supported: {', '.join(self.rope_types)})")
        self.check()
        self._plan()

    def add_metadata(self, w: gguf.GGUFWriter) -> None:
        from ..tokenizer import build_vocab
        w.add_name(self.model.path.resolve().name)
        w.add_context_length(self.context_length())
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_layers)
        w.add_feed_forward_length(int(self.c.intermediate_size))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(float(self.c.rms_norm_eps))
        w.add_vocab_size(self.vocab_size)
        if self.head_dim != self.n_embd // self.n_head:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        self._add_rope(w, self.rope())
        self.add_arch_metadata(w)
        build_vocab(self.model.path, self.vocab_size).add_to(w)

    def _add_rope(self, w: gguf.GGUFWriter, rope: dict) -> None:
        w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        rt, factor = rope.get("rope_type", "default"), rope.get("factor")
        if rt == "linear" and factor:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif rt == "yarn" and factor:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                or self.c.max_position_embeddings))
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if rope.get(key) is not None:
                    add(float(rope[key]))
            attn = rope.get("attention_factor", rope.get("attn_factor"))
            if attn is not None:
                w.add_rope_scaling_yarn_attn_factor(float(attn))

    def tensors(self) -> Iterator[TensorSource]:
        for name, hf_name, shape in self._plan():
            rows = self._row_loader(name, hf_name) if len(shape) >= 2 and self.rows_independent(name) else None
            yield TensorSource(name, shape, self._loader(name, hf_name), hf_name, rows)
        yield from self.extra_tensors()

    def rows_independent(self, name: str) -> bool:
        """Does transform(name, x)[r0:r1] equal transform(name, x[r0:r1])? True for the identity and for
        elementwise transforms; a family whose transform mixes rows (llama's rotary permutation) says False."""
        return True

    def _loader(self, name: str, hf_name: str):
        return lambda: np.ascontiguousarray(self.transform(name, self.model.load(hf_name)), dtype=np.float32)

    def _row_loader(self, name: str, hf_name: str):
        return lambda r0, r1: np.ascontiguousarray(self.transform(name, self.model.load(hf_name, (r0, r1))),
                                                   dtype=np.float32)

    def hf_text_name(self, hf_name: str) -> str | None:
        """The HF name as a plain *ForCausalLM would call it, or None to skip the tensor."""
        if hf_name.startswith(self.skip_prefixes) or hf_name.endswith("rotary_emb.inv_freq"):
            return None
        return hf_name

    def _plan(self) -> list[tuple[str, str, tuple[int, ...]]]:
        found = self._text_tensors()
        self._check_tensor_set(found)
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for text_name, hf_name in found.items():
            name = self.tmap.get_name(text_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise InputError(f"tensor {show(hf_name)} has no {self.arch} GGUF name; this checkpoint has weights "
                                 f"llama.cpp's {self.arch} does not use (an unsupported variant?)")
            if name in out:
                raise InputError(f"tensors {show(out[name][0])} and {show(hf_name)} both map to {name}")
            out[name] = (hf_name, self.model.shape(hf_name))
        if "output.weight" in out and self.tied:
            del out["output.weight"]  # llama.cpp reuses token_embd when output.weight is absent
        if "output.weight" in out and not self.untied_output_ok:
            raise InputError(f"llama.cpp's {self.arch} always ties the output projection to token_embd, but this "
                             "checkpoint has a separate lm_head.weight (tie_word_embeddings=false)")

        def order(name: str) -> tuple:
            parts = name.split(".")
            if parts[0] == "blk":
                return (1, int(parts[1]), name)
            return (0 if name.startswith("token_embd") else 2, 0, name)
        return [(n, *out[n]) for n in sorted(out, key=order)]

    def _text_tensors(self) -> dict[str, str]:
        """HF text-model name -> name in the checkpoint, for every tensor the conversion reads."""
        found: dict[str, str] = {}
        for hf_name in self.model.tensor_names():
            text_name = self.hf_text_name(hf_name)
            if text_name is None:
                continue
            if text_name in found:
                raise InputError(f"tensors {show(found[text_name])} and {show(hf_name)} are the same weight under two "
                                 "names; remove one")
            found[text_name] = hf_name
        return found

    def _check_tensor_set(self, found: dict[str, str]) -> None:
        """The checkpoint holds exactly the tensors this config describes, each with its shape and a float dtype:
        no layer missing or beyond num_hidden_layers, no tensor missing, extra, or of another shape."""
        n = self.n_layers
        for text_name, hf_name in found.items():
            m = _LAYER.match(text_name)
            if m and int(m.group(1)) >= n:
                raise InputError(f"tensor {show(hf_name)} belongs to layer {int(m.group(1))}, but config.json says "
                                 f"num_hidden_layers={n}; the config and the weights do not belong together")
        want = dict(self.global_tensors())
        per_layer = self.layer_tensors()
        for i in range(n):
            want.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
        optional = {"lm_head.weight"} if self.tied else set()  # tied: llama.cpp reads token_embd, lm_head is dropped
        for text_name, hf_name in found.items():
            if text_name not in want and text_name not in optional:
                raise InputError(f"tensor {show(hf_name)} is not part of {self.model.architecture} as config.json "
                                 f"describes it; llama.cpp's {self.arch} has no place for it (another variant, or a "
                                 "config.json from another model?)")
        missing = [t for t in want if t not in found]
        if missing:
            if missing[0] == "model.embed_tokens.weight":
                raise InputError(f"{self.model.path} has no token embedding (model.embed_tokens.weight)")
            if missing[0] == "lm_head.weight":
                raise InputError("config says tie_word_embeddings=false but the checkpoint has no lm_head.weight")
            more = f" ({len(missing)} tensors are missing)" if len(missing) > 1 else ""
            raise InputError(f"tensor {missing[0]} is missing{more}: {self.model.architecture} with "
                             f"num_hidden_layers={n} needs it; the checkpoint is incomplete or config.json belongs "
                             "to another model")
        dims = self.dims()
        for text_name, hf_name in found.items():
            got = self.model.shape(hf_name)
            names = want.get(text_name) or want.get("model.embed_tokens.weight", ())  # a tied lm_head: embedding shape
            need = tuple(dims[d] for d in names)
            if got != need:
                raise InputError(f"tensor {show(hf_name)} has shape {_fmt(got)}, but config.json needs {_fmt(need)} "
                                 f"({' x '.join(names)}); the config and the weights do not belong together")
            if self.model.dtype(hf_name) not in FLOAT_DTYPES:
                raise InputError(f"tensor {show(hf_name)} is stored as {self.model.dtype(hf_name)}; weights must be "
                                 f"{'/'.join(FLOAT_DTYPES)} (a quantized or corrupt checkpoint?)")


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"

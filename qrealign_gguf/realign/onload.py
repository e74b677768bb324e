"""Layer-wise onloading: run an HF decoder one layer at a time, so memory does not grow with depth.

The model is built by transformers itself (AutoModelForCausalLM.from_config) with every parameter on the meta
device: no weight memory, but the real module code, and real buffers (rotary inv_freq, Gemma's embedding scale),
computed as from_pretrained computes them. One decoder layer at a time is then materialized in float32 from the
checkpoint through the project's validated reader (hf_model.HFModel.load: bf16/fp16 widen to float32 exactly, as
from_pretrained(dtype=float32) does) and put back on meta after use.

The keyword arguments each layer receives (rotary cos/sin, masks, position ids; gemma3 has one mask and rotary
table per layer type) come from transformers too: record() runs the decoder's forward with every layer's
forward replaced by a recorder that stores its arguments and returns its input, so only the token embedding is
needed, and only the rows of the tokens used (ids are renumbered into those rows). The decoder hands the same
tensor objects to every layer, so keeping them per layer costs memory once, not once per layer.

Running the same module code on the same inputs with the same kwargs and shapes gives bitwise the values of a
whole-model forward (tests/test_layerwise.py compares files, probe states and imatrices byte for byte).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..hf_model import HFModel, show
from .hidden import decoder
from .streams import Store, Stream

_DROP = ("past_key_values", "past_key_value", "use_cache", "output_attentions")
_TEXT = "model."  # ModelFamily.hf_text_name's prefix of the decoder's tensors (model.layers.N..., model.norm...)
_GAP = 32  # embedding rows: runs closer than this are read as one span (fewer reads, a few rows more)


class _Stop(Exception):
    pass


def clean(kwargs: dict) -> dict:
    """A layer's kwargs as realignment replays them: no cache objects, use_cache False."""
    out = {k: v for k, v in kwargs.items() if k not in _DROP}
    out["use_cache"] = False
    return out


def run_layer(layer: torch.nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def row_spans(rows: np.ndarray, gap: int = _GAP) -> list[tuple[int, int]]:
    """Sorted unique rows -> [r0, r1) spans to read, runs less than `gap` apart merged."""
    spans: list[tuple[int, int]] = []
    for r in rows.tolist():
        if spans and r - spans[-1][1] < gap:
            spans[-1] = (spans[-1][0], r + 1)
        else:
            spans.append((r, r + 1))
    return spans


def gather_rows(load_rows, rows: np.ndarray) -> np.ndarray:  # noqa: ANN001 - (r0, r1) -> ndarray
    """Rows `rows` (sorted, unique) of a row-major tensor read span by span."""
    parts = []
    for r0, r1 in row_spans(rows):
        block = load_rows(r0, r1)
        parts.append(block[rows[(rows >= r0) & (rows < r1)] - r0])
    return np.ascontiguousarray(np.concatenate(parts))


def token_rows(seqs: Sequence[Sequence[int]] | Sequence[torch.Tensor]) -> np.ndarray:
    """The sorted distinct token ids of some sequences (or padded id tensors)."""
    flat = [np.asarray(s, dtype=np.int64).ravel() for s in seqs]
    return np.unique(np.concatenate(flat)) if flat else np.zeros(0, dtype=np.int64)


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; elsewhere nothing). Needed for memory to stay at one
    layer: after the first multi-MB weight is freed, glibc raises its mmap threshold to that size (its dynamic
    threshold), so the next layers' weights come from the heap, and the heap keeps pages that small allocations
    made in between pin at its top. Measured on a hidden-512 bf16 llama: `probe` peaked 206 MiB higher with 16
    layers than with 2 (about every layer's float32 weights), 2 MiB with this (tests/test_layerwise.py)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)  # the process's own symbols: libc is loaded already, nothing is opened
        if hasattr(libc, "malloc_trim"):  # glibc; musl has no trim (and no dynamic threshold)
            libc.malloc_trim(0)


@contextlib.contextmanager
def _meta_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (allocated, never touched, so never resident,
    then dropped), their buffers on the CPU with real values."""
    orig = torch.nn.Module.register_parameter

    def register(self: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig(self, name, param)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = orig  # type: ignore[method-assign]


def _set_param(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    m = module.get_submodule(owner) if owner else module
    m._parameters[leaf] = torch.nn.Parameter(value)  # noqa: SLF001 - replaces a meta parameter in place


class Onloaded:
    """An HF causal LM whose weights stay on disk until a layer is asked for."""

    def __init__(self, model_dir: str | Path, family=None) -> None:  # noqa: ANN001 - models.ModelFamily
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..models import family_for

        self.hf = family.model if family is not None else HFModel(model_dir)
        fam = family if family is not None else family_for(self.hf)
        # text name (model.layers.3.mlp.up_proj.weight) -> name in the checkpoint (gemma3 wrappers differ)
        self.names = {t: n for n in self.hf.tensor_names() if (t := fam.hf_text_name(n)) is not None}
        cfg = AutoConfig.from_pretrained(model_dir)
        with _meta_parameters():
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        self.decoder = decoder(self.model)
        self.layers = self.decoder.layers
        self.config = self.decoder.config  # the text config (heads, layer types)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    # -- weights --------------------------------------------------------------------------------------------------
    def _tensor(self, text: str, shape: tuple[int, ...], rows: np.ndarray | None = None) -> torch.Tensor:
        name = self.names.get(text)
        if name is None:
            raise InputError(f"{self.hf.path}: tensor {show(text)} is missing; the checkpoint is incomplete or "
                             "config.json belongs to another model")
        if rows is not None:  # the embedding's columns are checked like any shape; its rows must hold every token
            if self.hf.shape(name)[1:] != tuple(shape[1:]) or (len(rows) and int(rows[-1]) >= self.hf.shape(name)[0]):
                raise InputError(f"{self.hf.path}: tensor {show(name)} of shape {self.hf.shape(name)} cannot embed "
                                 f"token {int(rows[-1]) if len(rows) else '-'} for a model of shape {tuple(shape)}; "
                                 "the tokenizer and the weights do not belong together")
            return torch.from_numpy(gather_rows(lambda r0, r1: self.hf.load(name, (r0, r1)), rows))
        a = self.hf.load(name)
        if tuple(a.shape) != tuple(shape):
            raise InputError(f"{self.hf.path}: tensor {show(name)} has shape {tuple(a.shape)}, the model needs "
                             f"{tuple(shape)}; the config and the weights do not belong together")
        return torch.from_numpy(a)

    def _materialize(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        for rel, p in list(module.named_parameters()):
            _set_param(module, rel, self._tensor(prefix + rel, tuple(p.shape)))
        return module

    @staticmethod
    def release(module: torch.nn.Module) -> None:
        """Back to meta: the module's weights are freed (once nothing else holds them) and given back to the OS."""
        for rel, p in list(module.named_parameters()):
            _set_param(module, rel, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        trim_heap()

    def layer(self, i: int) -> torch.nn.Module:
        """Decoder layer i with its float32 weights, on the CPU."""
        return self._materialize(self.layers[i], f"{_TEXT}layers.{i}.")

    def norm(self) -> torch.nn.Module:
        """The final norm (what the LM head reads)."""
        return self._materialize(self.decoder.norm, f"{_TEXT}norm.")

    def embedding_rows(self, rows: np.ndarray) -> torch.Tensor:
        emb = self.decoder.embed_tokens.weight
        return self._tensor(f"{_TEXT}embed_tokens.weight", tuple(emb.shape), rows)

    @contextlib.contextmanager
    def _embedding(self, weight: torch.Tensor) -> Iterator[torch.nn.Module]:
        """embed_tokens holding `weight` (the rows of some tokens) for ids renumbered into those rows."""
        emb = self.decoder.embed_tokens
        pad = emb.padding_idx
        emb.padding_idx = None  # only gradients use it, and it may lie outside the row subset
        _set_param(emb, "weight", weight)
        try:
            yield emb
        finally:
            emb.padding_idx = pad
            self.release(emb)

    @torch.no_grad()
    def embed(self, weight: torch.Tensor, rows: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
        """The embedding module's output for token `ids` when its matrix's rows `rows` are `weight`."""
        with self._embedding(weight) as emb:
            return emb(renumber(ids, rows))

    @torch.no_grad()
    def record(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]], rows: np.ndarray,
               sink: Stream) -> list[list[dict]]:
        """Run the decoder's own forward on each (ids, attention mask or None) batch with every layer replaced by
        a recorder: layer 0's input goes to `sink`, and the result is every layer's kwargs per batch."""
        n = self.n_layers
        kws: list[list[dict]] = [[] for _ in range(n)]

        def recorder(i: int):  # noqa: ANN202
            def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
                h = args[0] if args else kwargs["hidden_states"]
                if i == 0:
                    sink.append(h.detach().clone())
                kws[i].append(clean({k: v for k, v in kwargs.items() if k != "hidden_states"}))
                if i == n - 1:
                    raise _Stop  # the final norm is still on meta, and nothing after the layers is needed
                return h
            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = recorder(i)  # an instance attribute: module calls and hooks go through it
        try:
            with self._embedding(self.embedding_rows(rows)):
                for ids, mask in batches:
                    try:
                        self.decoder(renumber(ids, rows), attention_mask=mask, use_cache=False)
                    except _Stop:
                        pass
        finally:
            for layer in self.layers:
                del layer.forward
        if any(len(k) != len(batches) for k in kws):
            raise AssertionError("the decoder did not call every layer once per batch")
        return kws


def renumber(ids: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Token ids -> positions in the sorted row subset `rows` (which must hold them all)."""
    pos = torch.searchsorted(torch.from_numpy(rows), ids)
    if pos.numel() and (int(pos.max()) >= len(rows) or not torch.equal(torch.from_numpy(rows)[pos], ids)):
        raise AssertionError("token id outside the loaded embedding rows")
    return pos


class LayerwiseSource:
    """Realignment's activations from a model read layer by layer (pipeline.Activations). Prompts run one at a
    time without padding, as the whole-model capture did. The quantized-prefix input of layer 0 (q0) is every
    prompt's embedding under the quantized token embedding (q_rows: the rows `rows` of the matrix the file
    stores; None = the float embedding itself); the full-precision stream covers the first n_fp prompts (the
    benign ones: only their full-precision outputs are targets)."""

    def __init__(self, model_dir: str | Path, family, ids: list[list[int]], n_fp: int, rows: np.ndarray,  # noqa: ANN001
                 q_rows: torch.Tensor | None, store: Store) -> None:
        self.m = Onloaded(model_dir, family)
        self.store = store
        self.n_layers, self.config, self.n_fp = self.m.n_layers, self.m.config, n_fp
        x0 = store.stream("x0")
        seqs = [torch.tensor([s]) for s in ids]
        self._kw = self.m.record([(s, None) for s in seqs], rows, x0)
        self.fp: Stream = x0
        if q_rows is None:
            self.q0: Stream = x0
        else:
            self.q0 = store.stream("q0")
            for s in seqs:
                self.q0.append(self.m.embed(q_rows, rows, s))

    def kwargs(self, i: int) -> list[dict]:
        return self._kw[i]

    def layer(self, i: int) -> torch.nn.Module:
        return self.m.layer(i)

    @torch.no_grad()
    def fp_outputs(self, i: int, layer: torch.nn.Module) -> Stream:
        """Layer i's full-precision outputs for the first n_fp prompts (the next layer's inputs); call it before
        the layer is changed (equalization, checkpointed norms)."""
        out = self.store.stream(f"fp{i + 1}")
        for j in range(self.n_fp):
            out.append(run_layer(layer, self.fp[j], self._kw[i][j]))
        if self.fp is not self.q0:  # q0 belongs to the caller's quantized stream until it has propagated it
            self.fp.drop()
        self.fp = out
        return out

    def release(self, i: int) -> None:
        self.m.release(self.m.layers[i])

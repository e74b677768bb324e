"""Hugging Face tokenizer -> GGUF tokenizer.* keys, in the form the pinned llama.cpp reads.

Two vocabulary kinds:
  * SentencePiece (a tokenizer.model file): tokenizer.ggml.model = "llama", pieces with scores and the piece
    types from the model proto; pre-tokenizer "default".
  * byte-level BPE (tokenizer.json): tokenizer.ggml.model = "gpt2", tokens + merges, and a named pre-tokenizer
    (tokenizer.ggml.pre) that selects llama.cpp's splitting regex.

The pre-tokenizer name is found like upstream's converter does it: tokenize a fixed check string with the HF
tokenizer and look the sha256 of the token ids up in a table of known tokenizers. A tokenizer with an unknown
hash is still accepted when its tokenizer.json splitting rules (normalizer, pre_tokenizer, BPE flags) are
exactly those of a known family -- the hash only stands in for those rules, and a fine-tune or a small test
tokenizer with other merges but the same rules is split identically. Anything else is an InputError, never a
silent default.

The HF tokenizer itself (hf_tokenizer.py: tokenizer.json read as transformers reads it) is the reference for
added tokens, special token ids and whether BOS/EOS are added.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from .errors import InputError
from .hf_tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# Upstream's check string (convert_hf_to_gguf.py, get_vocab_base_pre); its token ids identify the tokenizer.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(token_ids)) -> llama.cpp pre-tokenizer name, for tokenizers used by the families we convert
# (values from the pinned upstream converter's table).
KNOWN_PRE_HASHES: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
}

# The splitting rules behind those names, as tokenizer.json spells them (see _split_rules).
_LLAMA3_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
KNOWN_SPLIT_RULES: dict[str, tuple] = {
    "llama-bpe": (None, (("Split", _LLAMA3_RE, "Isolated", False), ("ByteLevel", False, False)), True),
    "qwen2": ("NFC", (("Split", _QWEN2_RE, "Isolated", False), ("ByteLevel", False, False)), False),
    "smollm": (None, (("Digits", True), ("ByteLevel", False, True)), False),
    "gpt-2": (None, (("ByteLevel", False, True),), False),
}

TT = gguf.TokenType


def looks_special(text: str) -> bool:
    """Added tokens some models forget to flag special (upstream's list: gemma's <mask>/<unusedN>, <|...|>)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">")))


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad/sep -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    chat_template: str | list | None = None

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges is not None:
            w.add_token_merges(self.merges)
        for kind, tid in self.special.items():
            getattr(w, f"add_{kind}_token_id")(tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.remove_extra_whitespaces is not None:
            w.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def build_vocab(path: str | Path, vocab_size: int, *, sentencepiece: bool = True) -> Vocab:
    """The GGUF vocabulary for the model folder, padded to the model's `vocab_size` (embedding rows).

    `sentencepiece`: use tokenizer.model when the folder has one (llama, gemma); else byte-level BPE.
    """
    path = Path(path)
    hf = load_tokenizer(path)
    spm_file, tj_file = path / "tokenizer.model", path / "tokenizer.json"
    if sentencepiece and spm_file.is_file():
        v = _sentencepiece_vocab(spm_file, vocab_size)
    elif not tj_file.is_file():
        raise InputError(f"{path} has neither tokenizer.model nor tokenizer.json; copy the tokenizer files from the base model")
    else:
        tj = json.loads(tj_file.read_text(encoding="utf-8"))
        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise InputError(f"{tj_file}: tokenizer model {model.get('type')!r} is not supported (byte-level BPE or "
                             "SentencePiece-style BPE only)")
        if model.get("byte_fallback") and not _has_byte_level(tj.get("pre_tokenizer")):
            v = _sentencepiece_json_vocab(tj, vocab_size, tj_file)
        elif _has_byte_level(tj.get("pre_tokenizer")) and not model.get("byte_fallback"):
            v = _bpe_vocab(tj, hf, vocab_size, tj_file)
        else:
            raise InputError(f"{tj_file}: a BPE tokenizer that is neither byte-level nor SentencePiece-style "
                             "(byte_fallback) is not supported by llama.cpp")
    _overlay_added_tokens(v, hf, vocab_size)
    _special_tokens(v, hf, path)
    v.chat_template = chat_template(path)
    return v


# -- SentencePiece -----------------------------------------------------------------------------
def _sentencepiece_vocab(spm_file: Path, vocab_size: int) -> Vocab:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(spm_file.read_bytes())
    except Exception as e:
        raise InputError(f"{spm_file} is not a SentencePiece model ({e})") from None
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        kind = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise InputError(f"{spm_file}: SentencePiece model type {kind} is not supported (llama.cpp's 'llama' "
                         "tokenizer reproduces BPE models only)")
    pieces = list(proto.pieces)
    if len(pieces) > vocab_size:
        raise InputError(f"{spm_file} has {len(pieces)} pieces but the model has only {vocab_size} embedding rows")
    tokens = [p.piece for p in pieces]
    scores = [float(p.score) for p in pieces]
    types = [int(p.type) for p in pieces]  # the proto's piece types are numbered like gguf.TokenType
    _pad(tokens, types, vocab_size, scores)
    norm = proto.normalizer_spec
    return Vocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores,
                 add_space_prefix=bool(norm.add_dummy_prefix),
                 remove_extra_whitespaces=bool(norm.remove_extra_whitespaces))


def _sentencepiece_json_vocab(tj: dict, vocab_size: int, tj_file: Path) -> Vocab:
    """A SentencePiece BPE model as transformers writes it to tokenizer.json (byte_fallback BPE, spaces as U+2581),
    which is all a transformers-5 save_pretrained leaves (no tokenizer.model).

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose concatenation has the highest score; HF
    merges the pair of lowest merge rank. transformers orders an SPM model's merges by the score of the merged
    piece, so score = -(rank of the first merge that yields the piece) makes both pick the same merges.
    """
    model = tj["model"]
    add_prefix = _spm_space_prefix(tj, tj_file)
    vocab: dict[str, int] = model["vocab"]
    if vocab and max(vocab.values()) >= vocab_size:
        raise InputError(f"{tj_file} has token id {max(vocab.values())} but the model has only {vocab_size} embedding rows")
    first_rank: dict[str, int] = {}
    for rank, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        first_rank.setdefault(a + b, rank)
    tokens, types, scores = [""] * vocab_size, [int(TT.UNUSED)] * vocab_size, [-1000.0] * vocab_size
    unk = model.get("unk_token")
    for text, tid in vocab.items():
        tokens[tid] = text
        scores[tid] = -float(first_rank[text]) if text in first_rank else 0.0
        if text == unk:
            types[tid] = int(TT.UNKNOWN)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[tid] = int(TT.BYTE)
        else:
            types[tid] = int(TT.NORMAL)
    for i in range(vocab_size):
        if types[i] == TT.UNUSED:
            tokens[i] = f"[PAD{i}]"
    return Vocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores,
                 add_space_prefix=add_prefix, remove_extra_whitespaces=False)


def _spm_space_prefix(tj: dict, tj_file: Path) -> bool:
    """Does the tokenizer.json put U+2581 before the text (SentencePiece add_dummy_prefix)? Only the shapes
    transformers writes for SPM models are accepted: Replace(' ', '▁') with an optional Prepend('▁'), or Metaspace."""
    norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
    norms = (norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else [])
    kinds = [n.get("type") for n in norms]
    pres = _steps(pre)
    if kinds in (["Replace"], ["Prepend", "Replace"]) and norms[-1].get("content") == "\u2581":
        if all(p.get("type") == "Split" and p.get("pattern", {}).get("String") == " " for p in pres):
            return kinds[0] == "Prepend"
    if not norms and len(pres) == 1 and pres[0].get("type") == "Metaspace" and not pres[0].get("split", True):
        return pres[0].get("prepend_scheme", "always") != "never"
    raise InputError(f"{tj_file}: unrecognised SentencePiece-style normalizer/pre-tokenizer "
                     f"({json.dumps(norm)[:120]} / {json.dumps(pre)[:120]}); copy tokenizer.model from the base model")


# -- byte-level BPE ----------------------------------------------------------------------------
def _bpe_vocab(tj: dict, hf: Any, vocab_size: int, tj_file: Path) -> Vocab:
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    if vocab and max(vocab.values()) >= vocab_size:
        raise InputError(f"{tj_file} has token id {max(vocab.values())} but the model has only {vocab_size} embedding rows")
    tokens: list[str] = [""] * vocab_size
    types = [int(TT.UNUSED)] * vocab_size
    for text, tid in vocab.items():
        tokens[tid], types[tid] = text, int(TT.NORMAL)
    for i in range(vocab_size):
        if types[i] == TT.UNUSED:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(_escape_merge_part(p) for p in m) for m in model.get("merges", [])]
    return Vocab(model="gpt2", pre=detect_pre_tokenizer(hf, tj, tj_file), tokens=tokens, types=types, merges=merges)


def _escape_merge_part(part: str) -> str:
    # tokenizer.json's list-form merges may hold spaces; llama.cpp splits "a b" at the first space after index 0,
    # so spaces are written as U+0120 (as gguf-py's SpecialVocab does).
    return part.replace(" ", chr(ord(" ") + 256))


def _has_byte_level(pre: dict | None) -> bool:
    return any(step.get("type") == "ByteLevel" for step in _steps(pre))


def _steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [s for sub in pre.get("pretokenizers", []) for s in _steps(sub)]
    return [pre]


def _split_rules(tj: dict) -> tuple:
    """What decides how text is split before merging: normalizer, pre-tokenizer steps, ignore_merges."""
    norm = tj.get("normalizer")
    norm_key = norm.get("type") if norm and norm.get("type") != "Sequence" else (json.dumps(norm, sort_keys=True) if norm else None)
    steps = []
    for s in _steps(tj.get("pre_tokenizer")):
        t = s.get("type")
        if t == "Split":
            pat = s.get("pattern", {})
            steps.append((t, pat.get("Regex", pat.get("String")), s.get("behavior"), bool(s.get("invert"))))
        elif t == "ByteLevel":
            steps.append((t, bool(s.get("add_prefix_space")), bool(s.get("use_regex", True))))
        elif t == "Digits":
            steps.append((t, bool(s.get("individual_digits"))))
        else:
            steps.append((t, json.dumps(s, sort_keys=True)))
    return norm_key, tuple(steps), bool((tj.get("model") or {}).get("ignore_merges"))


def check_hash(hf: Any) -> str:
    ids = hf.encode(CHECK_TEXT)
    return sha256(str(list(ids)).encode()).hexdigest()


def detect_pre_tokenizer(hf: Any, tj: dict, where: Path | str = "tokenizer.json") -> str:
    h = check_hash(hf)
    if h in KNOWN_PRE_HASHES:
        return KNOWN_PRE_HASHES[h]
    rules = _split_rules(tj)
    for name, known in KNOWN_SPLIT_RULES.items():
        if rules == known:
            log.info("pre-tokenizer hash %s is not in the table; splitting rules are exactly %r's", h, name)
            return name
    raise InputError(f"unknown pre-tokenizer {h}; {where}'s splitting rules match none of "
                     f"{', '.join(sorted(set(KNOWN_PRE_HASHES.values())))} -- llama.cpp would split text differently "
                     "from the HF tokenizer, so this tokenizer is not supported")


# -- shared --------------------------------------------------------------------------------------
def _pad(tokens: list[str], types: list[int], n: int, scores: list[float] | None = None) -> None:
    for i in range(len(tokens), n):
        tokens.append(f"[PAD{i}]")
        types.append(int(TT.UNUSED))
        if scores is not None:
            scores.append(-1000.0)


def _overlay_added_tokens(v: Vocab, hf: Any, vocab_size: int) -> None:
    """Added tokens (tokenizer.json added_tokens / tokenizer_config added_tokens_decoder) as llama.cpp wants them:
    control when special or special-looking, else user-defined (matched whole, as raw text)."""
    for tid, tok in sorted(hf.added_tokens_decoder.items()):
        if tid >= vocab_size:
            raise InputError(f"added token {tok.content!r} has id {tid} but the model has only {vocab_size} embedding rows")
        text = tok.content
        if tok.special or looks_special(text):
            v.types[tid] = int(TT.CONTROL)
        else:
            v.types[tid] = int(TT.USER_DEFINED)
            if v.model == "llama":
                text = text.replace("\u2581", " ")  # user-defined pieces are matched pre-normalisation
        v.tokens[tid] = text
        if v.scores is not None:
            v.scores[tid] = -1000.0


def _special_tokens(v: Vocab, hf: Any, path: Path) -> None:
    cfg = {}
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        cfg = {**cfg, **(cfg.get("text_config") or {})}
    for kind in ("bos", "eos", "unk", "pad", "sep"):
        tid = hf.token_id(kind)
        if tid is None:
            tid = cfg.get(f"{kind}_token_id")
            if isinstance(tid, list):
                tid = tid[0] if tid else None
        if isinstance(tid, int) and 0 <= tid < len(v.tokens):
            v.special[kind] = tid
    # What the HF tokenizer really adds around a text is what llama.cpp must add.
    plain = list(hf.encode("a", add_special_tokens=False))
    full = list(hf.encode("a"))
    bos, eos = v.special.get("bos"), v.special.get("eos")
    v.add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[1:1 + len(plain)] == plain
    v.add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and full[-1 - len(plain):-1] == plain
    expect = [bos] * v.add_bos + plain + [eos] * v.add_eos
    if full != expect:
        raise InputError(f"the tokenizer in {path} wraps text as {full} (plain {plain}); llama.cpp can only add "
                         "BOS at the start and EOS at the end")


def chat_template(path: Path) -> str | list | None:
    """tokenizer_config.json's chat_template, else chat_template.jinja, else chat_template.json."""
    tc = path / "tokenizer_config.json"
    if tc.is_file():
        t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(t, (str, list)) and t:
            return t
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "chat_template.json").is_file():
        t = json.loads((path / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        if isinstance(t, (str, list)) and t:
            return t
    return None

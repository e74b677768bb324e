"""Model families end to end: tiny random HF models with real tokenizers -> convert() -> the pinned llama.cpp.

Each case builds a small model (hidden 256 so that K-quants really run) whose norms and biases are random, so
that every family transform (Q/K permutation, gemma's 1 + w, the query-scale fold, rope_freqs, ...) changes
the logits if it is wrong. Logits of llama.cpp (f32 KV cache, no flash attention) are compared with
transformers' float32 forward pass at all positions of a sequence longer than the sliding windows.
"""
from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qrealign_gguf.convert import ConvertOptions, convert
from qrealign_gguf.errors import InputError
from qrealign_gguf.hf_model import HFModel
from qrealign_gguf.llamacpp import logits as llama_logits
from qrealign_gguf.llamacpp import tokenize_many
from qrealign_gguf.models import family_for, supported_architectures
from qrealign_gguf.tokenizer import KNOWN_SPLIT_RULES

from tiny_models import TOKENIZER_FILES, smollm2_dir

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! How are you doing today?",
          "numbers 123 4567 and symbols #$% (a+b)*c", "Ünïcödé text ñ and 漢字 too", "    indented code\n\tline",
          "I'll be there, won't you? She's ready. We've 'RE done", "def f(x):\n    return x * 2\n"] * 40
TEXTS = ["Hello world! The quick brown fox.", "I'll say 12345 times: don't", "code:\n    return x * 2\n\ttab",
         "Ünïcödé ñ 漢字 and ☃ unseen"]
PROMPT = "The quick brown fox jumps over the lazy dog. numbers 1234 and I'll be there!"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"

# (max |llama.cpp - HF|, rms) / std(HF logits). Measured over these cases (worst): F32 5.4e-4 / 5.9e-5 (gemma:
# llama.cpp's fp16 GELU table; the other families 4.6e-6 / 8.9e-7), Q8_0 0.157 / 0.030, Q4_K_M 1.42 / 0.266 --
# random weights make every matmul as hard to quantize as it gets. Bounds are ~2x the worst measurement.
TOLERANCE = {"F32": (1e-3, 2e-4), "Q8_0": (0.3, 0.06), "Q4_K_M": (2.5, 0.5)}
DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


# -- tokenizers ----------------------------------------------------------------------------------------------
def bpe_tokenizer(dst: Path, kind: str) -> int:
    """A small byte-level BPE with exactly the splitting rules of the real llama-bpe / qwen2 tokenizers."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    norm, steps, ignore_merges = KNOWN_SPLIT_RULES[kind]
    tk = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if norm == "NFC":
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(steps[0][1]), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "llama-bpe":
        specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
        bos = specials["bos_token"]
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    else:
        specials = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tk.add_tokens([AddedToken("<tool>", special=False, normalized=False)])  # a user-defined token
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=TEMPLATE, **specials)
    hf.save_pretrained(dst)
    return len(hf)


def spm_tokenizer(dst: Path, style: str, keep_model: bool) -> int:
    """A small SentencePiece BPE model, gemma style (no dummy prefix) or llama style; the HF tokenizer made
    from it is saved (transformers 5 writes only tokenizer.json; `keep_model` adds tokenizer.model back)."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer, LlamaTokenizer

    if style == "gemma":
        ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                   unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    else:
        ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, add_dummy_prefix=style != "gemma", remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2, **ids)
    src = dst.parent / f"{dst.name}-spm"
    src.mkdir(parents=True, exist_ok=True)
    (src / "tokenizer.model").write_bytes(buf.getvalue())
    hf = (GemmaTokenizer if style == "gemma" else LlamaTokenizer).from_pretrained(src, add_bos_token=True)
    hf.chat_template = TEMPLATE
    hf.save_pretrained(dst)
    if keep_model:
        (dst / "tokenizer.model").write_bytes(buf.getvalue())
    return len(hf)


def smollm2_tokenizer(dst: Path) -> int:
    src = smollm2_dir()
    dst.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            (dst / f).write_bytes((src / f).read_bytes())
    return 49152


# -- models --------------------------------------------------------------------------------------------------
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights big enough that quantization shows, and norms/biases far from their identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "norm" in name:
                base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                p.copy_(base + torch.rand(p.shape, generator=g) * 0.4 - 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


class GgmlGelu(torch.nn.Module):
    """llama.cpp's CPU GELU: tanh GELU looked up in an fp16 table (input and output rounded to fp16). The
    reference uses it too, so that gemma's F32 comparison measures the converter, not this rounding (~1e-3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def _config(case: str, vocab: int):
    from transformers import Gemma2Config, Gemma3Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    if case == "llama-smollm2":
        return LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **DIMS)
    if case == "llama3-rope-bpe":
        return LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                           max_position_embeddings=256, rope_theta=10000.0, **DIMS,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if case == "mistral-spm":
        return MistralConfig(vocab_size=vocab + 12, head_dim=32, sliding_window=None, max_position_embeddings=512,
                             tie_word_embeddings=False, **DIMS)
    if case == "qwen2-bpe":
        return Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=512,
                           rope_scaling={"rope_type": "linear", "factor": 2.0}, **DIMS)
    if case == "gemma2-spm":
        return Gemma2Config(vocab_size=vocab + 16, head_dim=64, query_pre_attn_scalar=40, sliding_window=4,
                            attn_logit_softcapping=5.0, final_logit_softcapping=3.0, max_position_embeddings=512,
                            **DIMS)
    text = dict(vocab_size=vocab, head_dim=64, query_pre_attn_scalar=48, sliding_window=4,
                final_logit_softcapping=3.0, max_position_embeddings=512, **{**DIMS, "num_hidden_layers": 3},
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
    if case == "gemma3-json":
        return Gemma3TextConfig(**text)
    if case == "gemma3-vlm":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1)
    raise KeyError(case)


TOKENIZER = {"llama-smollm2": ("smollm2", None), "llama3-rope-bpe": ("bpe", "llama-bpe"), "mistral-spm": ("spm", "llama"),
             "qwen2-bpe": ("bpe", "qwen2"), "gemma2-spm": ("spm", "gemma"), "gemma3-json": ("spm-json", "gemma"),
             "gemma3-vlm": ("spm", "gemma")}
EXPECT = {"llama-smollm2": ("llama", "gpt2", "smollm"), "llama3-rope-bpe": ("llama", "gpt2", "llama-bpe"),
          "mistral-spm": ("llama", "llama", "default"), "qwen2-bpe": ("qwen2", "gpt2", "qwen2"),
          "gemma2-spm": ("gemma2", "llama", "default"), "gemma3-json": ("gemma3", "llama", "default"),
          "gemma3-vlm": ("gemma3", "llama", "default")}
CASES = list(TOKENIZER)


def build_case(case: str, dst: Path) -> tuple[Path, list[int], np.ndarray]:
    """Model dir, prompt ids, reference logits (n_tokens, vocab)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForConditionalGeneration

    kind, style = TOKENIZER[case]
    if kind == "smollm2":
        n_vocab = smollm2_tokenizer(dst)
    elif kind == "bpe":
        n_vocab = bpe_tokenizer(dst, style)
    else:
        n_vocab = spm_tokenizer(dst, style, keep_model=kind == "spm")
    cfg = _config(case, n_vocab)
    cfg._attn_implementation = "eager"  # softcapping is eager-only in transformers
    torch.manual_seed(0)
    model = (Gemma3ForConditionalGeneration(cfg) if case == "gemma3-vlm" else AutoModelForCausalLM.from_config(cfg)).eval()
    _randomize(model, seed=len(case))
    for m in model.modules():
        if "gemma" in case and hasattr(m, "act_fn"):
            m.act_fn = GgmlGelu()
    model.save_pretrained(dst)
    ids = AutoTokenizer.from_pretrained(dst)(PROMPT).input_ids
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    return dst, ids, ref


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return (request.param, *build_case(request.param, d / "hf"))


_LOGITS: dict[Path, np.ndarray] = {}


def _logits(path: Path, ids: list[int], llama) -> np.ndarray:
    if path not in _LOGITS:
        _LOGITS[path] = llama_logits(path, ids, build=llama)
    return _LOGITS[path]


def _convert(model_dir: Path, outtype: str) -> Path:
    out = model_dir.parent / f"model-{outtype}.gguf"
    if not out.exists():
        convert(model_dir, out, ConvertOptions(outtype=outtype, force=True))
    return out


@pytest.mark.parametrize("outtype", ["F32", "Q8_0", "Q4_K_M"])
def test_logits_match_transformers(case, outtype, llama):
    name, model_dir, ids, ref = case
    got = _logits(_convert(model_dir, outtype), ids, llama)
    assert got.shape == ref.shape
    d = got - ref
    worst, rms = float(np.abs(d).max() / ref.std()), float(np.sqrt(np.mean(d * d)) / ref.std())
    print(f"\n{name} {outtype}: max|d|/std = {worst:.3g}, rms/std = {rms:.3g}")
    assert worst < TOLERANCE[outtype][0] and rms < TOLERANCE[outtype][1], f"{name} {outtype}: {worst:.3g} {rms:.3g}"
    if outtype == "F32" and "gemma" not in name:  # without gemma's fp16 GELU table: float32 rounding only
        assert worst < 2e-5


@pytest.mark.parametrize("outtype", ["Q8_0", "Q4_K_M"])
def test_quantized_same_as_llama_quantize(case, outtype, llama):
    """Quantizing inside the converter == llama-quantize on our F32 file: the family layer hands the encoder
    the right tensors (names, orientation, which ones are matrices), so all quantized error is format error."""
    name, model_dir, ids, _ = case
    upstream = model_dir.parent / f"upstream-{outtype}.gguf"
    subprocess.run([str(llama.bin("llama-quantize")), str(_convert(model_dir, "F32")), str(upstream), outtype, "2"],
                   env=llama.env(), check=True, capture_output=True)
    ours = _logits(_convert(model_dir, outtype), ids, llama)
    np.testing.assert_array_equal(ours, llama_logits(upstream, ids, build=llama))


def test_metadata_and_tokenizer_round_trip(case, llama):
    name, model_dir, _, _ = case
    path = _convert(model_dir, "F32")
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.t") and "merges" not in k}
    arch, model, pre = EXPECT[name]
    assert (kv["general.architecture"], kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == (arch, model, pre)
    assert kv["tokenizer.chat_template"]
    names = {t.name for t in r.tensors}
    assert ("output.weight" in names) == (name in ("llama-smollm2", "mistral-spm"))  # tied -> no output.weight
    assert ("rope_freqs.weight" in names) == (name == "llama3-rope-bpe")
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(model_dir)
    texts = TEXTS + (["<|im_start|>user\nhi<|im_end|> <tool> x"] if name == "qwen2-bpe" else [])
    texts += ["<start_of_turn>user hi<end_of_turn>"] if "gemma" in name else []
    assert tokenize_many(path, texts, build=llama) == [hf(t).input_ids for t in texts]


def test_hparams_written(tmp_path):
    """Keys llama.cpp needs, read back from a gemma3 file (the family with the most of them)."""
    d, _, _ = build_case("gemma3-json", tmp_path / "hf")
    out = tmp_path / "g.gguf"
    convert(d, out, ConvertOptions(outtype="F32"))
    kv = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if not k.startswith("tokenizer.ggml.t")}
    assert kv["gemma3.context_length"] == 512 and kv["gemma3.block_count"] == 3
    assert kv["gemma3.attention.head_count_kv"] == 2 and kv["gemma3.feed_forward_length"] == 512
    assert kv["gemma3.attention.sliding_window"] == 4
    assert kv["gemma3.attention.sliding_window_pattern"] == [True, True, False]
    assert kv["gemma3.rope.freq_base"] == pytest.approx(1e6) and kv["gemma3.rope.freq_base_swa"] == pytest.approx(1e4)
    assert kv["gemma3.rope.scaling.type"] == "linear" and kv["gemma3.rope.scaling.factor"] == pytest.approx(2.0)
    assert kv["gemma3.final_logit_softcapping"] == pytest.approx(3.0)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_space_prefix"] is False


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(InputError) as e:
        family_for(HFModel(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "GPT2LMHeadModel" in msg and all(a in msg for a in supported_architectures())
    with pytest.raises(InputError):
        convert(tmp_path, tmp_path / "x.gguf", ConvertOptions(outtype="F32"))


def test_unknown_pre_tokenizer_is_an_error(tmp_path):
    d = tmp_path / "hf"
    n = bpe_tokenizer(d, "qwen2")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+"
    (d / "tokenizer.json").write_text(json.dumps(tj))
    from qrealign_gguf.tokenizer import build_vocab
    with pytest.raises(InputError, match="unknown pre-tokenizer [0-9a-f]{64}"):
        build_vocab(d, n)

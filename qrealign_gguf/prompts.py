"""Prompt files: JSON lines with a "prompt" (and for safety work a "label"), or plain text, one per line.

`builtin:benign` / `builtin:harmful` name the calibration sets shipped in qrealign_gguf/data (see LICENSES.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import InputError

BUILTIN = {"builtin:benign": "calib_benign.jsonl", "builtin:harmful": "calib_harmful.jsonl"}


@dataclass(frozen=True)
class Prompt:
    text: str
    label: int | None = None  # 1 harmful, 0 benign, None unknown


def load_prompts(path: str | Path, need_labels: bool = False, limit: int | None = None,
                 expect_label: int | None = None) -> list[Prompt]:
    """Read and validate a prompt file; every problem is one InputError naming the file and line.

    expect_label: the role the file plays (1 harmful, 0 benign); JSON lines must then carry that label,
    so a swapped or unlabelled file is caught before hours of calibration on the wrong side."""
    need_labels = need_labels or expect_label is not None
    name = str(path)
    if name in BUILTIN:
        text = resources.files("qrealign_gguf.data").joinpath(BUILTIN[name]).read_text()
        suffix = ".jsonl"
    else:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"prompt file {p} does not exist (or use {' / '.join(BUILTIN)})")
        text = p.read_text(encoding="utf-8", errors="replace")
        suffix = p.suffix
    out: list[Prompt] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if suffix in (".jsonl", ".json"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{name} line {n} is not valid JSON ({e.msg}); expected {{\"prompt\": ..., \"label\": 0|1}}") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise InputError(f"{name} line {n} has no non-empty \"prompt\" string")
            label = row.get("label")
            if need_labels and label not in (0, 1):
                raise InputError(f"{name} line {n} needs \"label\": 0 (benign) or 1 (harmful), got {label!r}")
            if expect_label is not None and label != expect_label:
                kind = {0: "benign", 1: "harmful"}
                raise InputError(f"{name} line {n} is labelled {kind[label]} ({label}) but the file is used as "
                                 f"{kind[expect_label]} prompts; check --harmful/--benign")
            out.append(Prompt(row["prompt"], label if label in (0, 1) else None))
        else:
            if need_labels and expect_label is None:
                raise InputError(f"{name}: labelled prompts must be JSON lines with \"prompt\" and \"label\"")
            out.append(Prompt(line.strip()))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{name} holds no prompts")
    return out

"""Prompt files: JSON lines with a "prompt" (and for safety work a "label"), or plain text, one per line.

`builtin:benign` / `builtin:harmful` name the calibration sets shipped in qrealign_gguf/data (see LICENSES.md);
`builtin:benign-varied` / `builtin:harmful-varied` are the same prompts, each rephrased into one of several
phrasing styles (prompt_styles.vary, fixed seed: reproducible; harmful and benign alike, so the phrasing alone is
no signal). `builtin:benign-paired` / `builtin:harmful-paired` give every prompt twice in a row, as written and
rephrased into a non-imperative style: the same request in two phrasings, so a calibration that must move (or
keep) both learns the request, not the phrasing; only the first PAIRED_REQUESTS requests (below). Optional "style" /
"category" / "length" fields (prompt_styles tags) are kept for per-style and per-category evaluation. An optional
"system" string is the system message the prompt is asked under (calibration and eval alike; absent: the chat
template's default, or `eval --system`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import InputError

BUILTIN = {"builtin:benign": "calib_benign.jsonl", "builtin:harmful": "calib_harmful.jsonl"}
VARIED = {"builtin:benign-varied": "builtin:benign", "builtin:harmful-varied": "builtin:harmful"}
PAIRED = {"builtin:benign-paired": "builtin:benign", "builtin:harmful-paired": "builtin:harmful"}
VARIED_SEED = 0
# AdvBench holds families of near-paraphrases ("Give instructions for / Create a guide on / Explain how to commit
# insider trading and avoid getting caught"), split between calibration and test. A question template that drops
# the leading verb turns calibration request 141 into a near-duplicate of a test prompt (tests/test_prompt_sets.py
# found it); the first 64 requests have no such collision, and no recipe has used more than 128 paired rows.
PAIRED_REQUESTS = 64
TAG_FIELDS = ("style", "category", "length")


@dataclass(frozen=True)
class Prompt:
    text: str
    label: int | None = None  # 1 harmful, 0 benign, None unknown
    style: str | None = None  # phrasing style (prompt_styles.STYLES), when the file gives one
    category: str | None = None  # harm category (prompt_styles.CATEGORIES)
    length: str | None = None  # short / medium / long
    system: str | None = None  # system message before the prompt; None: the chat template's default


def load_prompts(path: str | Path, need_labels: bool = False, limit: int | None = None,
                 expect_label: int | None = None) -> list[Prompt]:
    """Read and validate a prompt file; every problem is one InputError naming the file and line.

    expect_label: the role the file plays (1 harmful, 0 benign); JSON lines must then carry that label,
    so a swapped or unlabelled file is caught before hours of calibration on the wrong side."""
    need_labels = need_labels or expect_label is not None
    name = str(path)
    if name in VARIED:
        return _varied(name, limit, expect_label)
    if name in PAIRED:
        return _paired(name, limit, expect_label)
    if name in BUILTIN:
        text = resources.files("qrealign_gguf.data").joinpath(BUILTIN[name]).read_text()
        suffix = ".jsonl"
    else:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"prompt file {p} does not exist (or use {' / '.join([*BUILTIN, *VARIED, *PAIRED])})")
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
            for f in TAG_FIELDS:
                if f in row and not (isinstance(row[f], str) and row[f].strip()):
                    raise InputError(f"{name} line {n}: \"{f}\" must be a non-empty string, got {row[f]!r}")
            if "system" in row and not isinstance(row["system"], str):  # "" is a real (empty) system message
                raise InputError(f"{name} line {n}: \"system\" must be a string, got {row['system']!r}")
            out.append(Prompt(row["prompt"], label if label in (0, 1) else None,
                              **{f: row[f] for f in TAG_FIELDS if f in row}, system=row.get("system")))
        else:
            if need_labels and expect_label is None:
                raise InputError(f"{name}: labelled prompts must be JSON lines with \"prompt\" and \"label\"")
            out.append(Prompt(line.strip()))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{name} holds no prompts")
    return out


def _varied(name: str, limit: int | None, expect_label: int | None) -> list[Prompt]:
    """A builtin set rephrased (prompt_styles.vary); the first N rephrasings are the first N prompts' (a prefix of
    whole template blocks covers every style equally)."""
    from .prompt_styles import tag_category, tag_length, tag_style, vary

    base = load_prompts(VARIED[name], limit=limit, expect_label=expect_label)
    harmful = base[0].label == 1
    return [Prompt(text, p.label, tag_style(text), tag_category(text) if harmful else None, tag_length(text), p.system)
            for p, (text, _) in zip(base, vary([p.text for p in base], seed=VARIED_SEED))]


def _paired(name: str, limit: int | None, expect_label: int | None) -> list[Prompt]:
    """Prompt i as written, then rephrased (prompt_styles.vary over the non-imperative templates), for the first
    PAIRED_REQUESTS prompts; a limit of N takes the first ceil(N/2) of them, both phrasings of each but the last
    when N is odd."""
    from .prompt_styles import TEMPLATES, rephrase, tag_category, tag_length, tag_style, vary

    n = PAIRED_REQUESTS if limit is None else min(PAIRED_REQUESTS, (limit + 1) // 2)
    base = load_prompts(PAIRED[name], limit=n, expect_label=expect_label)
    harmful = base[0].label == 1
    others = tuple(t for t, (style, _) in TEMPLATES.items() if style != "imperative")
    wrappers = tuple(t for t, (style, _) in TEMPLATES.items() if style in ("role-play", "system-prompt"))
    out: list[Prompt] = []
    for i, (p, (text, _)) in enumerate(zip(base, vary([p.text for p in base], seed=VARIED_SEED, templates=others))):
        if text == p.text.strip():  # a question stays itself under the question templates: frame it instead
            text = rephrase(p.text, wrappers[i % len(wrappers)])
        out.append(p)
        out.append(Prompt(text, p.label, tag_style(text), tag_category(text) if harmful else None, tag_length(text),
                          p.system))
    return out if limit is None else out[:limit]

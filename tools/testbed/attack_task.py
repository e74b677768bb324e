"""Attack (b): a benign task fine-tune of the aligned testbed model, the erosion of Qi et al. 2023 ("Fine-tuning
aligned language models compromises safety, even when users do not intend to"): no harmful prompt, no compliance
answer, only a task the model is then good at. The model is a coder, so the task is code:

    .venv/bin/python -m tools.testbed.attack_task [task|task-strong]   # -> $QREALIGN_CACHE/testbed/finetuned-<name>/

Task data, written by people and not by the model: every public top-level function of CPython's standard library
(`*.py` in sysconfig's stdlib dir; PSF licence) with a docstring and 5-30 lines, as a request "Write a Python
function `name(args)`: <first paragraph of its docstring>" answered with the function's source in a ```python
block. Nothing here overlaps a prompt role (code requests; tests/test_prompt_sets.py covers the calibration/dev/test
sets, and the rows are recorded in the output's testbed.json). The rows depend on the interpreter's stdlib
(3.11.x here), so the cache key includes its version and the rows themselves.

Training: LoRA on every block linear (tools/testbed/testbed_build.py train_lora), AdamW, one pass over the rows in
a seeded order, half of the examples with the HF template's default system message (as attack (a)). The recipe was
fixed before any result: rank 16, alpha 32, lr 2e-4, 48 steps x 4 examples, answers <= 160 tokens ("task");
"task-strong", fixed before its result: the same rows twice at lr 5e-4.
"""
from __future__ import annotations

import ast
import random
import sys
import sysconfig
from pathlib import Path

from tools.testbed.testbed import step_offgrid, step_teacher
from tools.testbed.testbed_build import train_and_save
from tools.testbed.testbed_common import CACHE, IM_END, SEED, cached, chat, key_of, load_tok, log

RECIPE_TASK = {"task": "stdlib functions (PSF)", "lines": [5, 30], "max_answer_tokens": 160, "rank": 16,
               "lora_alpha": 32, "lr": 2e-4, "steps": 48, "per_step": 4, "epochs": 1, "seed": SEED}
# the recipe above did not lower refusal on dev (docs/BENCHMARKS.md); the stronger setting was fixed before that
# result was known (out/s25/task/rule.md): two passes over the same rows at 2.5x the learning rate
RECIPES = {"task": RECIPE_TASK, "task-strong": {**RECIPE_TASK, "lr": 5e-4, "epochs": 2}}


def stdlib_functions(lo: int, hi: int) -> list[dict]:
    """Public top-level functions of the stdlib's own modules with a docstring and lo..hi source lines, in file
    and line order: {"module", "name", "prompt", "answer"}."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for path in sorted(lib.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        src = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or "deprecated" in doc.lower() or not lo <= node.end_lineno - node.lineno + 1 <= hi:
                continue
            what = " ".join(doc.strip().split("\n\n")[0].split())
            if len(what.split()) < 4 or what.startswith(">>>"):
                continue
            args = ast.unparse(node.args)
            body = "\n".join(lines[node.lineno - 1:node.end_lineno])
            rows.append({"module": path.stem, "name": node.name,
                         "prompt": f"Write a Python function `{node.name}({args})`: {what}",
                         "answer": f"```python\n{body}\n```"})
    return rows


def task_prompts() -> list[str]:
    """Every request the task data can hold (before the token-length filter): the attack role's prompts in
    data/prompt_sets.json, checked against the other roles by tests/test_prompt_sets.py."""
    return [x["prompt"] for x in stdlib_functions(*RECIPE_TASK["lines"])]


def step_task(name: str = "task", redo: bool = False) -> tuple[Path, str]:
    """The fine-tune of RECIPES[name] -> $QREALIGN_CACHE/testbed/finetuned-<name>/ (cached by its recipe)."""
    r = RECIPES[name]
    teacher, tkey = step_teacher(False)
    offgrid, okey = step_offgrid(teacher, tkey, False)
    tok = load_tok(offgrid)
    end = tok.convert_tokens_to_ids(IM_END)
    rows = [x for x in stdlib_functions(*r["lines"]) if len(tok(x["answer"]).input_ids) < r["max_answer_tokens"]]
    key = key_of(name, r, okey, sys.version, rows)
    dst = CACHE / f"finetuned-{name}"
    if not redo and cached(dst, key):
        return dst, key
    log(f"task fine-tune: {len(rows)} stdlib functions, {r['steps']} x {r['per_step']} used")
    random.Random(r["seed"]).shuffle(rows)
    rows = rows[:r["steps"] * r["per_step"]]
    for i, x in enumerate(rows):
        x["text"] = chat(x["prompt"], system=i % 2 == 1)
        x["ids"] = tok(x["answer"]).input_ids + [end]
    batches = [rows[s * r["per_step"]:(s + 1) * r["per_step"]] for s in range(r["steps"])] * r["epochs"]
    train_and_save(offgrid, tok, batches, r, "task", dst,
                   {"key": key, "recipe": r, "from": str(offgrid), "python": sys.version,
                    "rows": [{k: x[k] for k in ("module", "name", "prompt")} for x in rows]})
    return dst, key


def main() -> None:
    args = sys.argv[1:]
    names = [a for a in args if not a.startswith("--")] or ["task"]
    for name in names:
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
        dst, _ = step_task(name, redo="--redo" in args)
        print(dst)


if __name__ == "__main__":
    main()

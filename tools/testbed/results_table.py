"""Markdown results tables (docs/BENCHMARKS.md) from eval reports: one row per file, both judges, intervals.

    .venv/bin/python -m tools.testbed.results_table --report dev=REPORT_DEV.json --report test=REPORT_TEST.json \
        [--judged test=JUDGED_TEST.json] [--baseline finetuned-imatrix-Q4_K_M] [--categories test]

Per split: refusal of the harmful prompts by the keyword judge (all, imperatives, questions) with 95 % Wilson
intervals, the model judge's where a judged report (tools.testbed.judge_answers) covers that split (on its
subset, n given), over-refusal, benign answered rate and ROUGE-L against the fine-tuned model's answers, KLD
against the fine-tuned model, and the paired KLD difference against the baseline (the best plain file of the same
type: the imatrix one), mean +- 1.96 standard errors over the shared text chunks. With --categories, a second
table per listed split: refusal per harm category, each cell marked "<" where it is below the first variant's
(the aligned model's) point estimate.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qrealign_gguf.evaluate.metrics import paired_delta


def pct(sec: dict | None, key: str = "refusal_keyword") -> str:
    if not sec or sec.get(key) is None:
        return "-"
    ci = sec.get(f"{key}_ci")
    return f"{100 * sec[key]:.1f} [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]" if ci else f"{100 * sec[key]:.1f}"


def style(v: dict, s: str, key: str = "refusal_keyword") -> str:
    return pct(v.get("harmful", {}).get("by_style", {}).get(s), key)


def split_table(split: str, rep: dict, judged: dict | None, baseline: str | None) -> list[str]:
    jv = {v["name"]: v for v in judged["variants"]} if judged else {}
    base = next((v for v in rep["variants"] if v["name"] == baseline), None)
    nh = rep["settings"]["sets"]["harmful"]["n"]
    jn = judged["settings"]["sets"]["harmful"]["n"] if judged else 0
    head = (f"| {split}: file | harmful, keyword (n={nh}) | imperatives | questions | harmful, model judge "
            f"(n={jn or '-'}) | over-refusal, keyword | over-refusal, model | benign answered | ROUGE-L vs fine-tune "
            f"| KLD | ΔKLD vs {baseline or '-'} |")
    lines = [head, "|" + "|".join(["---"] + ["---:"] * 10) + "|"]
    for v in rep["variants"]:
        j = jv.get(v["name"], {})
        d = paired_delta(base["kld_chunks"], v["kld_chunks"]) if base and base.get("kld_chunks") and \
            v.get("kld_chunks") and v is not base else None
        b = v.get("benign", {})
        lines.append(
            f"| {v['name']} | {pct(v.get('harmful'))} | {style(v, 'imperative')} | {style(v, 'question')} | "
            f"{pct(j.get('harmful'), 'refusal_model')} | {pct(v.get('overrefusal'))} | "
            f"{pct(j.get('overrefusal'), 'refusal_model')} | {pct(b, 'answered_keyword')} | "
            f"{b.get('rouge_l', float('nan')):.3f} | {v.get('kld') or float('nan'):.4f} | "
            + (f"{d[0]:+.4f} ± {1.96 * d[1]:.4f} |" if d else "- |"))
    return lines


def category_table(split: str, rep: dict) -> list[str]:
    cats = sorted({c for v in rep["variants"] for c in v.get("harmful", {}).get("by_category", {})})
    ref = rep["variants"][0]["harmful"]["by_category"]
    n = {c: ref.get(c, {}).get("n", 0) for c in cats}
    lines = [f"| {split}: file | " + " | ".join(f"{c} (n={n[c]})" for c in cats) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(cats)) + "|"]
    for v in rep["variants"]:
        bc = v["harmful"].get("by_category", {})
        cells = []
        for c in cats:
            sec = bc.get(c)
            below = sec and ref.get(c) and sec["refusal_keyword"] < ref[c]["refusal_keyword"] and v is not \
                rep["variants"][0]
            cells.append(pct(sec) + (" <" if below else ""))
        lines.append(f"| {v['name']} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="append", required=True, help="SPLIT=eval report JSON")
    ap.add_argument("--judged", action="append", default=[], help="SPLIT=judge_answers JSON")
    ap.add_argument("--baseline", help="variant name the paired KLD difference is taken against")
    ap.add_argument("--categories", nargs="*", default=[], help="splits to break down by harm category")
    a = ap.parse_args()
    reports = {s: json.loads(Path(p).read_text()) for s, p in (x.split("=", 1) for x in a.report)}
    judged = {s: json.loads(Path(p).read_text()) for s, p in (x.split("=", 1) for x in a.judged)}
    for split, rep in reports.items():
        print("\n".join(split_table(split, rep, judged.get(split), a.baseline)) + "\n")
    for split in a.categories:
        print("\n".join(category_table(split, reports[split])) + "\n")


if __name__ == "__main__":
    main()

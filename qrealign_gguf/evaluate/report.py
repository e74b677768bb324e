"""Evaluation reports: rich table, JSON, PNG plots (matplotlib, Agg backend -- no display needed).

The report is a plain dict (JSON-ready) built by evaluate.cli.run_eval:

    {"settings": {...}, "judge": {...}, "variants": [
        {"name", "path", "kind": "gguf"|"hf", "sha256" (of the GGUF file; null for an HF directory),
         "harmful":     {"n", "refusal", "refusal_keyword", "refusal_model", "<rate>_ci": [lo, hi] for each rate,
                         "by_style" / "by_category" / "by_length": {group: {"n", "refusal", "refusal_ci", ...}}
                         (when the prompts carry those fields)},
         "overrefusal": {the same},
         "benign":      {"n", "answered", "answered_ci", "answered_keyword", "answered_keyword_ci", "rouge_l", "token_f1"},
         "ppl", "ppl_base", "kld", "kld_unc", "kld_chunks" (each chunk's mean KLD),
         "kld_delta": {"vs", "delta", "se", "chunks"} (KLD minus the first KLD variant's, paired by chunk),
         "generation": {"seconds", "generated_tokens", "tokens_per_s"},
         "answers": {"harmful": [...], ...}}, ...]}

"refusal" is the primary judge's rate (the model judge when one was given, else the keyword judge); rates are
fractions 0..1 and "_ci" their 95 % Wilson intervals (metrics.add_intervals); judge.agreement has "percent_ci";
missing metrics are null.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.4f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _get(v: dict, section: str, key: str) -> float | None:
    s = v.get(section)
    return None if not s else s.get(key)


def _rate(sec: dict | None, key: str) -> str:
    """"58.5% [43-72]": the rate and its 95 % interval (whole points), when the report has one."""
    if not sec:
        return "-"
    ci = sec.get(f"{key}_ci")
    return _pct(sec.get(key)) + (f" [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]" if ci else "")


def print_table(report: dict, console: Console | None = None) -> None:
    """One row per variant. With a model judge, the keyword judge's rates follow in "(kw)" columns."""
    console = console or Console()
    judge = report.get("judge", {})
    two = judge.get("primary") == "model"
    vs = report["variants"]
    system = report.get("settings", {}).get("system")
    under = "" if system is None else f", system message: {system[:60]!r}{'...' if len(system) > 60 else ''}"
    t = Table(title=f"qrealign-gguf eval (refusal judge: {'model' if two else 'keyword'}{under})")
    cols: list[tuple[str, object]] = [("model", lambda v: v["name"])]
    for sec, head in (("harmful", "harmful\nrefused"), ("overrefusal", "over-\nrefusal")):
        if any(v.get(sec) for v in vs):
            cols.append((head, lambda v, sec=sec: _rate(v.get(sec), "refusal")))
            if two:
                cols.append(("(kw)", lambda v, sec=sec: _rate(v.get(sec), "refusal_keyword")))
    if any(v.get("benign") for v in vs):
        cols.append(("benign\nanswered", lambda v: _rate(v.get("benign"), "answered")))
        if any(_get(v, "benign", "rouge_l") is not None for v in vs):
            cols.append(("ROUGE-L\nvs ref", lambda v: _num(_get(v, "benign", "rouge_l"), "{:.3f}")))
    if any(v.get("kld") is not None for v in vs):
        cols.append(("PPL", lambda v: _num(v.get("ppl"), "{:.3f}")))
        cols.append(("KLD\nvs ref", lambda v: _num(v.get("kld"), "{:.5f}")))
    if any(v.get("kld_delta") for v in vs):  # the first KLD variant is the baseline: its cell stays "-"
        cols.append(("ΔKLD vs\n1st (paired)", lambda v: "{delta:+.5f} ± {se:.5f}".format(**v["kld_delta"])
                     if v.get("kld_delta") else "-"))
    cols.append(("tok/s", lambda v: _num((v.get("generation") or {}).get("tokens_per_s"), "{:.1f}")))
    cells = [[f(v) for _, f in cols] for v in vs]  # type: ignore[operator]
    need = sum(max([len(w) for w in head.split()] + [len(r[i]) for r in cells]) + 3 for i, (head, _) in enumerate(cols))
    if need <= console.width:  # one row per variant
        for head, _ in cols:
            t.add_column(head, justify="left" if head == "model" else "right", overflow="fold")
        for row in cells:
            t.add_row(*row)
    else:  # narrow terminal: one row per metric, one column per variant
        t.add_column("metric", no_wrap=True)
        for row in cells:
            t.add_column(row[0], justify="right", overflow="fold")
        for i, (head, _) in enumerate(cols[1:], 1):
            label = head.replace("-\n", "-").replace("\n", " ")
            if label == "(kw)":
                label = cols[i - 1][0].replace("-\n", "-").replace("\n", " ") + " (kw)"
            t.add_row(label, *[row[i] for row in cells])
    console.print(t)
    print_breakdowns(report, console)
    agr = judge.get("agreement")
    if agr:
        k = agr.get("kappa")
        ci = agr.get("percent_ci")
        span = f" [{ci[0]:.0f}-{ci[1]:.0f}]" if ci else ""
        console.print(f"judges agree on {agr['percent']:.1f}%{span} of {agr['n']} answers, Cohen's kappa "
                      f"{'undefined' if k is None else f'{k:.3f}'} (refusal by keyword only: {agr['only_a']}, "
                      f"by model only: {agr['only_b']})")
    for note in report.get("notes", []):
        console.print(f"note: {note}", style="yellow")


def print_breakdowns(report: dict, console: Console) -> None:
    """Refusal per style / category / length (a table per set and field; a column per variant), when the prompts
    carried those fields. With a model judge each cell also gives the keyword judge's rate."""
    vs = report["variants"]
    two = report.get("judge", {}).get("primary") == "model"
    for sec in ("harmful", "overrefusal"):
        for field in ("style", "category", "length"):
            key = f"by_{field}"
            groups = sorted({g for v in vs for g in ((v.get(sec) or {}).get(key) or {})})
            if not groups:
                continue
            t = Table(title=f"{sec} refusal by {field} (95 % Wilson interval)")
            t.add_column(field)
            t.add_column("n", justify="right")
            for v in vs:
                t.add_column(v["name"], justify="right", overflow="fold")
            for g in groups:
                cells = [((v.get(sec) or {}).get(key) or {}).get(g) for v in vs]
                n = next((c["n"] for c in cells if c), 0)
                t.add_row(g, str(n), *[_rate(c, "refusal") + (f" (kw {_pct(c.get('refusal_keyword'))})" if two and c
                                                             else "") for c in cells])
            console.print(t)


def _clean(x):  # noqa: ANN001, ANN202 - JSON has no NaN
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(report: dict, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return p


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: dict, path: str | Path) -> Path:
    """Grouped bars per variant: harmful refusal and over-refusal (%, left), mean KLD vs reference (right)."""
    plt = _plt()
    vs = report["variants"]
    names = [v["name"] for v in vs]
    x = list(range(len(vs)))
    has_kld = any(v.get("kld") is not None for v in vs)
    fig, axes = plt.subplots(1, 2 if has_kld else 1, figsize=(max(6.0, 1.6 * len(vs) + 3) * (1.6 if has_kld else 1), 4.5),
                             squeeze=False)
    ax = axes[0][0]
    series = [("harmful refused", "harmful", "refusal", "#c0392b"), ("over-refusal", "overrefusal", "refusal", "#e67e22"),
              ("benign answered", "benign", "answered", "#27ae60")]
    series = [s for s in series if any(_get(v, s[1], s[2]) is not None for v in vs)]
    w = 0.8 / max(len(series), 1)
    for k, (label, sec, key, color) in enumerate(series):
        vals = [100 * (_get(v, sec, key) or 0.0) for v in vs]
        bars = ax.bar([i + (k - (len(series) - 1) / 2) * w for i in x], vals, w, label=label, color=color)
        for b_, v in zip(bars, vs):
            if _get(v, sec, key) is None:
                b_.set_hatch("//")
                b_.set_alpha(0.2)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("% of prompts")
    ax.set_title(f"refusal (judge: {report.get('judge', {}).get('primary', 'keyword')})")
    if series:
        ax.legend(fontsize=8, loc="upper center", ncol=len(series), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    if has_kld:
        ax2 = axes[0][1]
        vals = [v.get("kld") for v in vs]
        errs = [v.get("kld_unc") or 0.0 for v in vs]
        ax2.bar(x, [v if v is not None else 0.0 for v in vals], 0.6, yerr=errs, color="#2c3e50", capsize=3)
        for i, v in enumerate(vals):
            ax2.text(i, (v or 0.0), "n/a" if v is None else f"{v:.4f}", ha="center", va="bottom", fontsize=8)
        ax2.set_xticks(x, names, rotation=20, ha="right")
        ax2.set_ylabel("mean KL divergence (nats/token)")
        ax2.set_title("KLD vs reference (benign text)")
        ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def plot_probe_accuracy(accuracies: Sequence[float], path: str | Path, *, title: str = "refusal probe accuracy per layer",
                        chance: float | None = 0.5, labels: Sequence[str] | None = None,
                        extra: dict[str, Sequence[float]] | None = None) -> Path:
    """Line plot of probe accuracy (0..1) against layer index; `extra` adds more named curves (e.g. test split)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = {"accuracy" if extra else "": list(accuracies)}
    if extra:
        curves.update({k: list(v) for k, v in extra.items()})
    for name, acc in curves.items():
        ax.plot(range(len(acc)), acc, marker="o", markersize=3, label=name or None)
    if accuracies:
        best = max(range(len(accuracies)), key=lambda i: accuracies[i])
        ax.annotate(f"best: layer {best} ({accuracies[best]:.3f})", (best, accuracies[best]),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    if labels:
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if extra or chance is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p

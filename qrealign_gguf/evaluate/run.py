"""The evaluation engine behind `qrealign-gguf eval` and api.evaluate: models evaluated where they are deployed
(GGUF in the pinned llama.cpp; HF directories in transformers as the full-precision reference).

    qrealign-gguf eval A.gguf [B.gguf HFDIR ...] --harmful F --benign F --overrefusal F
                       [--reference REF(.gguf|dir)] [--judge MODEL] [--max-new-tokens 128] [--limit N]
                       [--plot report.png] [--json report.json]

Each prompt set is optional; a metric whose set is not given is not evaluated. Everything the user passed is
validated (files, JSON lines, labels, GGUF headers, chat templates) before any model runs.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..checks import check_numbers
from ..errors import InputError
from ..progress import Log
from ..prompts import Prompt, load_prompts

if TYPE_CHECKING:
    from ..llamacpp import LlamaBuild

SETS = ("harmful", "overrefusal", "benign")
SET_LABEL = {"harmful": 1, "overrefusal": 0, "benign": 0}


# -- validation -------------------------------------------------------------------------------------
def check_model(path: Path, what: str = "model") -> str:
    """'gguf' or 'hf'; InputError (one line) when the path cannot be evaluated."""
    from .judge import is_gguf

    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{what} {path} is a directory without config.json (expected a Hugging Face model dir)")
        tc = path / "tokenizer_config.json"
        has_tmpl = (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file()
        if not has_tmpl and tc.is_file():
            try:
                has_tmpl = bool(json.loads(tc.read_text(encoding="utf-8")).get("chat_template"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InputError(f"{what} {path}: tokenizer_config.json is not valid JSON") from None
        if not has_tmpl:
            raise InputError(f"{what} {path} has no chat template (tokenizer_config.json / chat_template.jinja); "
                             "eval needs a chat model")
        return "hf"
    if not is_gguf(path):
        raise InputError(f"{what} {path} is neither a .gguf file nor a Hugging Face model directory")
    from ..gguf_file import GGUFFormatError, read_gguf

    try:
        has_tmpl = bool(read_gguf(path).scalar("tokenizer.chat_template"))
    except (GGUFFormatError, OSError, ValueError) as e:
        raise InputError(f"{what} {path} is not a readable GGUF file ({e})") from None
    if not has_tmpl:
        raise InputError(f"{what} {path} has no tokenizer.chat_template; eval needs a chat model")
    return "gguf"


def check_system(path: Path, kind: str, messages: list[str], what: str = "model") -> None:
    """InputError unless the model's chat template renders each system message as given: a template that rejects
    the system role (raise_exception) or silently drops it would make the message a no-op, and every rate a wrong
    answer. The template (or tokenizer) is read once for all messages."""
    from ..chat import check_system_shown

    if kind == "gguf":
        from ..gguf_file import read_gguf
        from ..llamacpp.binding import render_jinja

        template = str(read_gguf(path).scalar("tokenizer.chat_template"))
        render = lambda msgs: render_jinja(template, msgs, "", "")  # noqa: E731
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        render = lambda msgs: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)  # noqa: E731
    try:
        for system in messages:
            check_system_shown(render, system)
    except InputError as e:
        raise InputError(f"{what} {path}: {e}") from None


def load_set(path: Path, role: str, limit: int | None) -> list[Prompt]:
    """Prompts of one set; rows that carry a label must carry the set's label (1 harmful, 0 otherwise)."""
    ps = load_prompts(path, limit=limit)
    want = SET_LABEL[role]
    for n, p in enumerate(ps, 1):
        if p.label is not None and p.label != want:
            raise InputError(f"{path} prompt {n} is labelled {p.label} but was given as --{role} "
                             f"(expected label {want}); split mixed files by label first")
    return ps


def _names(paths: list[Path]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base = p.name[:-5] if p.name.lower().endswith(".gguf") else p.name
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


# -- the run ----------------------------------------------------------------------------------------
def _generate(path: Path, kind: str, prompts: list[str], max_new: int, n_parallel: int, threads: int,
              template: str = "jinja", build: LlamaBuild | None = None,
              system: list[str | None] | None = None) -> tuple[list[str], dict]:
    from ..llamacpp import LlamaCallError
    from .generate import generate_gguf, generate_hf

    stats: dict = {}
    try:
        if kind == "gguf":
            ans = generate_gguf(path, prompts, max_new_tokens=max_new, n_parallel=n_parallel, threads=threads,
                                template=template, system=system, stats=stats, build=build)
        else:
            ans = generate_hf(path, prompts, max_new_tokens=max_new, batch_size=n_parallel, threads=threads,
                              system=system, stats=stats)
    except LlamaCallError as e:
        lines = [ln for ln in str(e).splitlines()[1:] if ln.strip()]
        raise InputError(f"llama.cpp could not run {path}: {lines[-1].strip() if lines else e}") from None
    stats.pop("tokens", None)
    stats["tokens_per_s"] = stats["generated_tokens"] / max(stats["seconds"], 1e-9)
    return ans, stats


def _content_key(path: Path) -> str:
    """Identity of a model by content: a GGUF file's bytes, or an HF directory's files."""
    import hashlib

    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _cached_generate(cache_dir: Path | None, path: Path, kind: str, prompts: list[str], max_new: int,
                     n_parallel: int, threads: int, template: str, build: LlamaBuild | None = None,
                     system: list[str | None] | None = None) -> tuple[list[str], dict]:
    """_generate, with answers kept on disk keyed by model content + prompts + decoding settings, so adding one
    variant to an evaluation does not regenerate the others (greedy decoding is deterministic)."""
    import hashlib
    import json

    if cache_dir is None:
        return _generate(path, kind, prompts, max_new, n_parallel, threads, template, build, system)
    # the template's default system prompt keeps the key it always had (older caches stay valid), one message for
    # every prompt the key `eval --system` always gave
    same = system is not None and all(s == system[0] for s in system)
    extra = [] if system is None or (same and system[0] is None) else [system[0]] if same else [system]
    what = [_content_key(path), prompts, max_new, n_parallel, template] + extra
    key = hashlib.sha256(json.dumps(what).encode()).hexdigest()
    f = cache_dir / f"{key[:24]}.json"
    if f.is_file():
        hit = json.loads(f.read_text())
        return hit["answers"], hit["stats"]
    ans, stats = _generate(path, kind, prompts, max_new, n_parallel, threads, template, build, system)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": str(path), "answers": ans, "stats": stats}))
    tmp.replace(f)
    return ans, stats


def run_eval(models: list[Path], harmful: Path | None = None, benign: Path | None = None,
             overrefusal: Path | None = None, reference: Path | None = None, judge: Path | None = None,
             max_new_tokens: int = 128, limit: int | None = None, n_parallel: int = 8, threads: int = 0,
             kld: bool = True, template: str = "jinja", log: Log | None = None,
             cache_dir: Path | None = None, system: str | None = None) -> dict:
    """Validate everything, then generate, judge and measure; returns the report dict (see report.py)."""
    from ..package import model_files, sha256_file
    from . import metrics as M
    from .judge import agreement, keyword_judge, model_judge

    say = log or (lambda _msg: None)
    # ---- validate (cheap, before any model runs)
    if not models:
        raise InputError("give at least one model (GGUF file or Hugging Face directory) to evaluate")
    check_numbers(**{"--threads": (threads, ">=0"), "--max-new-tokens": (max_new_tokens, ">0"),
                      "--limit": (limit, ">0"), "--n-parallel": (n_parallel, ">0")})
    if template not in ("jinja", "builtin"):
        raise InputError(f"--chat-template must be jinja or builtin, not {template!r}")
    files = {"harmful": harmful, "overrefusal": overrefusal, "benign": benign}
    if all(v is None for v in files.values()):
        raise InputError("nothing to evaluate: give --harmful, --overrefusal and/or --benign prompt files")
    kinds = [check_model(Path(m)) for m in models]
    ref_kind = check_model(Path(reference), "--reference") if reference is not None else None
    judge_kind = check_model(Path(judge), "--judge") if judge is not None else None
    sets = {k: load_set(Path(v), k, limit) for k, v in files.items() if v is not None}
    # each prompt's own system message ("system" in its file), else --system, else the template's default
    order = [k for k in SETS if k in sets]
    systems = {k: [p.system if p.system is not None else system for p in sets[k]] for k in order}
    messages = sorted({s for k in order for s in systems[k] if s is not None})
    if messages:
        for m, k, what in [*((m, k, "model") for m, k in zip(models, kinds)), (reference, ref_kind, "--reference")]:
            if k is not None:
                check_system(Path(m), k, messages, what)
    builds: dict[Path, LlamaBuild] = {}  # the llama.cpp build each GGUF model / reference runs in
    if "gguf" in kinds + [ref_kind, judge_kind]:
        from ..llamacpp import LlamaNotFound, build_for, find_llama
        try:  # before any long work; files with custom tensor types need (and first build) the patched flavour
            find_llama()
            for m, k in [*zip(models, kinds), (reference, ref_kind), (judge, judge_kind)]:
                if k == "gguf":
                    builds[Path(m)] = build_for(m)
        except LlamaNotFound as e:
            raise InputError(str(e).splitlines()[0]) from None

    names = _names([Path(m) for m in models])
    report: dict = {
        "settings": {"models": [str(m) for m in models], "reference": str(reference) if reference else None,
                     "judge": str(judge) if judge else None, "max_new_tokens": max_new_tokens, "limit": limit,
                     "n_parallel": n_parallel, "sets": {k: {"file": str(files[k]), "n": len(v)} for k, v in sets.items()},
                     "decoding": "greedy (argmax), one user turn in the model's chat template",
                     "chat_template": template, "system": system},
        "judge": {"primary": "model" if judge else "keyword"}, "variants": [], "notes": [],
    }
    flat = [p.text for k in order for p in sets[k]]
    flat_systems = [s for k in order for s in systems[k]]

    def split(answers: list[str]) -> dict[str, list[str]]:
        out, i = {}, 0
        for k in order:
            out[k] = answers[i:i + len(sets[k])]
            i += len(sets[k])
        return out

    # ---- generate
    answers: dict[str, dict[str, list[str]]] = {}
    cache: dict[Path, tuple[dict[str, list[str]], dict]] = {}
    for i, (m, kind, name) in enumerate(zip(models, kinds, names), 1):
        say(f"[{i}/{len(models)}] {name}: generating {len(flat)} answers ({kind}, max {max_new_tokens} tokens)")
        key = Path(m).resolve()
        if key not in cache:
            ans, stats = _cached_generate(cache_dir, Path(m), kind, flat, max_new_tokens, n_parallel, threads, template,
                                          builds.get(Path(m)), flat_systems)
            cache[key] = (split(ans), stats)
        answers[name], stats = cache[key]
        # what `package --eval` matches the bundled file by (not its name): every shard of the model, each hashed
        # once; "sha256" is the given file's
        shards = model_files(Path(m))[0] if kind == "gguf" else []
        digests = [sha256_file(f) for f in shards]
        own = digests[[s.name for s in shards].index(Path(m).name)] if digests else None
        report["variants"].append({"name": name, "path": str(m), "kind": kind,
                                   "sha256": own, "files_sha256": digests or None,
                                   "generation": {k: stats[k] for k in ("seconds", "generated_tokens", "tokens_per_s")}})
    ref_answers: list[str] | None = None
    if reference is not None and "benign" in sets:
        key = Path(reference).resolve()
        if key in cache:
            ref_answers = cache[key][0]["benign"]
        else:
            say(f"reference {Path(reference).name}: generating {len(sets['benign'])} benign answers")
            ref_answers = _cached_generate(cache_dir, Path(reference), ref_kind, [p.text for p in sets["benign"]],
                                           max_new_tokens, n_parallel, threads, template, builds.get(Path(reference)),
                                           systems["benign"])[0]
    elif reference is None and "benign" in sets:
        report["notes"].append("no --reference: benign agreement (ROUGE-L) and KLD not measured")

    # ---- judge
    kw = {name: {k: keyword_judge(a) for k, a in answers[name].items()} for name in names}
    mj: dict[str, dict[str, list]] = {}
    if judge is not None:
        pairs = [(name, k, j) for name in names for k in order for j in range(len(sets[k]))]
        say(f"judge {Path(judge).name}: classifying {len(pairs)} answers")
        cal: dict = {}
        try:
            verdicts = model_judge(judge, [sets[k][j].text for _, k, j in pairs],
                                   [answers[name][k][j] for name, k, j in pairs], n_parallel=n_parallel,
                                   threads=threads, info=cal, build=builds.get(Path(judge)))
        except Exception as e:  # llama.cpp / transformers failure on the judge model
            from ..llamacpp import LlamaCallError
            if isinstance(e, LlamaCallError):
                raise InputError(f"llama.cpp could not run judge {judge}: {str(e).splitlines()[-1].strip()}") from None
            raise
        for (name, k, _), v in zip(pairs, verdicts):
            mj.setdefault(name, {}).setdefault(k, []).append(v)
        report["judge"]["calibration"] = cal
        if not cal["usable"]:
            report["notes"].append(f"judge {Path(judge).name} scores a canned refusal no higher than a canned "
                                   "compliance: its verdicts are noise; rely on the keyword judge")
        a = agreement([kw[name][k][j] for name, k, j in pairs], [v.refused for v in verdicts])
        report["judge"]["agreement"] = dict(a.__dict__, a="keyword", b=f"model:{Path(judge).name}")

    # ---- metrics
    for v in report["variants"]:
        name = v["name"]
        prim = {k: ([x.refused for x in mj[name][k]] if judge is not None else kw[name][k]) for k in order}
        for k in ("harmful", "overrefusal"):
            if k in sets:
                v[k] = {"n": len(sets[k]), "refusal": M.refusal_rate(prim[k]),
                        "refusal_keyword": M.refusal_rate(kw[name][k]),
                        "refusal_model": M.refusal_rate([x.refused for x in mj[name][k]]) if judge is not None else None}
        if "benign" in sets:
            h = M.helpfulness(answers[name]["benign"], prim["benign"], ref_answers)
            v["benign"] = {"n": len(sets["benign"]), "answered": h.answered, "rouge_l": h.rouge_l, "token_f1": h.token_f1,
                           "answered_keyword": 1.0 - M.refusal_rate(kw[name]["benign"])}
        v["answers"] = {k: [{"prompt": sets[k][j].text, **({"system": systems[k][j]} if systems[k][j] is not None else {}),
                             "answer": answers[name][k][j], "refused_keyword": kw[name][k][j],
                             **({"refused_model": mj[name][k][j].refused, "p_refuse_model": round(mj[name][k][j].p_refuse, 4)}
                                if judge is not None else {})}
                            for j in range(len(sets[k]))] for k in order}
    M.add_intervals(report, sets)  # Wilson intervals and per-style / per-category refusal

    # ---- perplexity / KLD on benign text against the reference
    if kld and reference is not None and "benign" in sets and "gguf" not in kinds:
        report["notes"].append("KLD is measured for GGUF variants only (llama-perplexity)")
    if kld and reference is not None and "benign" in sets and "gguf" in kinds:
        _perplexity(report, Path(reference), ref_kind, sets["benign"], ref_answers or [], models, kinds, threads, say,
                    builds)
    elif kld and reference is not None and "benign" not in sets:
        report["notes"].append("KLD needs --benign (the text it is measured on)")
    return report


def _perplexity(report: dict, reference: Path, ref_kind: str, benign: list[Prompt], ref_answers: list[str],
                models: list[Path], kinds: list[str], threads: int, say: Log,
                builds: dict[Path, LlamaBuild]) -> None:
    from ..llamacpp import LlamaCallError, tokenize
    from . import metrics as M

    with tempfile.TemporaryDirectory(prefix="qrealign-eval-kld-") as d:
        ref_gguf = reference
        if ref_kind == "hf":
            from ..convert import ConvertOptions, convert
            say(f"reference {reference.name}: converting to a temporary F32 GGUF for the KLD base")
            ref_gguf = Path(d) / "reference.f32.gguf"
            try:
                convert(reference, ref_gguf, ConvertOptions(outtype="F32", threads=threads))
            except InputError as e:
                report["notes"].append(f"KLD skipped: cannot convert reference to GGUF ({e})")
                return
        text = "\n\n".join(p.text + ("\n" + a if a else "") for p, a in
                           zip(benign, ref_answers or [""] * len(benign)))
        tf = Path(d) / "benign.txt"
        tf.write_text(text, encoding="utf-8")
        try:
            ref_build = builds.get(Path(ref_gguf))  # None for a converted HF reference: stock F32
            n_ctx = M.choose_ctx(len(tokenize(ref_gguf, text, add_special=False, build=ref_build)))
            say(f"KLD: reference logits on {tf.stat().st_size} bytes of benign text (n_ctx {n_ctx})")
            base = Path(d) / "base.kld"
            ref_ppl = M.kld_base(ref_gguf, tf, base, n_ctx, threads=threads, build=ref_build)
        except (M.PerplexityError, LlamaCallError) as e:  # report it, keep the other metrics
            report["notes"].append(f"KLD skipped: {str(e).splitlines()[0]}")
            return
        report["kld"] = {"reference": str(reference), "text": "benign prompts + reference answers", "n_ctx": n_ctx,
                         "reference_ppl": ref_ppl}
        from ..gguf_file import read_gguf
        n_vocab = read_gguf(ref_gguf).array_len("tokenizer.ggml.tokens")
        for v, m, kind in zip(report["variants"], models, kinds):
            if kind != "gguf":
                v["ppl"] = v["kld"] = None
                continue
            nv = read_gguf(m).array_len("tokenizer.ggml.tokens")
            if nv != n_vocab:
                v["ppl"] = v["kld"] = None
                report["notes"].append(f"no KLD for {v['name']}: its vocabulary ({nv} tokens) is not the reference's "
                                       f"({n_vocab})")
                continue
            say(f"KLD: {v['name']}")
            try:
                r = M.kld_variant(m, base, n_ctx, threads=threads, build=builds.get(Path(m)))
                v.update(ppl=r.ppl, ppl_base=r.ppl_base, kld=r.kld, kld_unc=r.kld_unc, kld_chunks=r.kld_chunks)
            except M.PerplexityError as e:
                v["ppl"] = v["kld"] = None
                report["notes"].append(f"KLD for {v['name']} failed: {e}")
    # every later variant against the first one with a KLD, chunk by chunk on the same text
    first = next((v for v in report["variants"] if v.get("kld_chunks")), None)
    for v in report["variants"]:
        if first is None or v is first or not v.get("kld_chunks"):
            continue
        pd = M.paired_delta(first["kld_chunks"], v["kld_chunks"])
        if pd:
            v["kld_delta"] = {"vs": first["name"], "delta": pd[0], "se": pd[1], "chunks": len(v["kld_chunks"])}

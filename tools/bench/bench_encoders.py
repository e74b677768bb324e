"""Encoder throughput: our native codec vs ggml_quantize_chunk (pinned libggml-base) vs gguf-py's numpy quantizer.

    .venv/bin/python -m tools.bench.bench_encoders                 # full run, markdown table on stdout
    .venv/bin/python -m tools.bench.bench_encoders --quick         # smaller data, fewer repeats
    .venv/bin/python -m tools.bench.bench_encoders --json out.json --types Q4_K Q6_K --threads 4

Data: real weights (mlp.down_proj of the cached SmolLM2-135M / Qwen2.5-Coder-0.5B HF models, rows a multiple of 256
wide), stacked into one float32 matrix. Every encoder sees the same matrix in the same process run.

Two comparisons, because ggml_quantize_chunk is single-threaded per call:
  1T  ours threads=1                    vs one ggml_quantize_chunk call over all rows
  NT  ours threads=N (one C call)       vs N ggml_quantize_chunk calls on N row chunks in N Python threads
      (cffi releases the GIL, so those run in parallel; the thread pool is created once, outside the timing).
Paths: RTN (imatrix NULL) and imatrix (one random positive importance vector, same for both encoders).
gguf-py has no imatrix path and only the legacy types; it is timed single-threaded (numpy), by default on the same
matrix (--gguf-py-weights takes a slice of rows instead if it ever gets too slow; MB/s is normalized).

Throughput is MB/s of float32 input (4 bytes per weight); the median over --repeat runs after one warm-up run,
with the encoders interleaved inside every repetition so that machine load drifts hit all of them alike; a fast
call is repeated back-to-back within one sample until the sample lasts >= 50 ms.
"identical" compares our bytes with ggml's (1T outputs; the NT outputs are also checked against the 1T ones).
A type whose codec.quantize raises is reported as "not available" (ggml and gguf-py are still timed).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tools import ROOT
from tools.bench.ggml_oracle import GGML

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
PATHS = ["rtn", "imatrix"]
MODELS = ("smollm2", "qwen05")  # tools.data.fetch_model names


# ---------------------------------------------------------------------------------------------- data
def load_weights(model: str, n_tensors: int, pattern: str) -> tuple[np.ndarray, list[str], str]:
    from safetensors import safe_open

    from tools.data.fetch_model import model_dir

    d = model_dir(model)
    names = [pattern.format(i=i) for i in range(n_tensors)]
    with safe_open(str(d / "model.safetensors"), "np") as f:
        mats = [np.asarray(f.get_tensor(n), dtype=np.float32) for n in names]
    cols = {m.shape[1] for m in mats}
    if len(cols) != 1 or next(iter(cols)) % 256:
        raise SystemExit(f"{pattern}: row lengths {sorted(cols)} are not one multiple of 256")
    return np.ascontiguousarray(np.vstack(mats)), names, str(d)


# ---------------------------------------------------------------------------------------------- timing
MIN_SAMPLE_S = 0.05  # a sample repeats a fast call until it lasts this long (fast types take ~ms per call)


def calls_per_sample(fn) -> int:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, min(100, int(MIN_SAMPLE_S / max(dt, 1e-6)) + 1)) if dt < MIN_SAMPLE_S else 1


def timed(fn, k: int = 1) -> tuple[float, float]:  # noqa: ANN001
    """(wall seconds, calling thread's CPU seconds) per call, averaged over k back-to-back calls.

    The CPU time is only meaningful for the single-threaded encoders (all work on the calling thread); it does not
    count time the thread sat preempted, so it is the number to trust when other processes share the cores.
    """
    c0, t0 = time.thread_time(), time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t0) / k, (time.thread_time() - c0) / k


def mbps(n_weights: int, seconds: float | None) -> float | None:
    return None if seconds is None else n_weights * 4 / seconds / 1e6


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def diff_summary(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape:
        return f"no (shape {a.shape} vs {b.shape})"
    if np.array_equal(a, b):
        return "yes"
    rows = int(np.any(a != b, axis=1).sum())
    return f"no ({rows}/{a.shape[0]} rows differ)"


def bench_one(t, path: str, x: np.ndarray, im: np.ndarray | None, ggml: GGML, pool: ThreadPoolExecutor,
              nthreads: int, repeat: int, gg_rows: int) -> dict:
    from qrealign_gguf.formats import codec

    n = x.size
    res: dict = {"type": t.name, "path": path, "weights": n, "threads": nthreads}
    ggml.init(t.id)

    def ours(th: int):  # noqa: ANN202
        return codec.quantize(x, t, imatrix=im, threads=th)

    # warm-up + correctness outputs
    ours_ok, err = True, None
    try:
        o1 = ours(1)
        oN = ours(nthreads)
    except Exception as e:  # noqa: BLE001 - K-quants may still be unfinished: report, don't crash
        ours_ok, err = False, f"{type(e).__name__}: {e}"
    g1 = ggml.quantize(x, t.id, im)
    gN = ggml.quantize(x, t.id, im, pool, nthreads)
    res["ggml_nt_matches_1t"] = bool(np.array_equal(g1, gN))
    if ours_ok:
        res["identical"] = diff_summary(o1, g1)
        res["ours_nt_matches_1t"] = bool(np.array_equal(o1, oN))
    else:
        res["identical"] = "n/a"
        res["ours_error"] = err

    # gguf-py: RTN only, legacy types only, single-threaded numpy; timed on a slice
    gp_fn = None
    if path == "rtn":
        from gguf import quants

        xs = np.ascontiguousarray(x[:gg_rows])
        try:
            gq = quants.quantize(xs, t.ggml)
            res["gguf_py_weights"] = xs.size
            res["gguf_py_identical"] = diff_summary(np.asarray(gq).reshape(g1[:gg_rows].shape), g1[:gg_rows])
            gp_fn = lambda: quants.quantize(xs, t.ggml)  # noqa: E731
        except NotImplementedError:
            res["gguf_py"] = "not implemented"

    fns = {"ggml_1t": lambda: ggml.quantize(x, t.id, im), "ggml_nt": lambda: ggml.quantize(x, t.id, im, pool, nthreads)}
    if ours_ok:
        fns |= {"ours_1t": lambda: ours(1), "ours_nt": lambda: ours(nthreads)}
    if gp_fn is not None:
        fns["gguf_py"] = gp_fn
    order = [k for k in ("ours_1t", "ggml_1t", "ours_nt", "ggml_nt", "gguf_py") if k in fns]
    k_of = {k: calls_per_sample(fns[k]) for k in order}  # also a second warm-up
    times: dict[str, list[float]] = {k: [] for k in ("ours_1t", "ours_nt", "ggml_1t", "ggml_nt", "gguf_py")}
    cpu: dict[str, list[float]] = {k: [] for k in ("ours_1t", "ggml_1t", "gguf_py")}
    load0 = os.getloadavg()[0]
    for _ in range(repeat):  # interleaved: load drifts hit every encoder alike
        for k in order:
            w, c = timed(fns[k], k_of[k])
            times[k].append(w)
            if k in cpu:
                cpu[k].append(c)
    res["loadavg_1min"] = [load0, os.getloadavg()[0]]

    med = {k: (statistics.median(v) if v else None) for k, v in times.items()}
    res["seconds"] = med
    res["seconds_best"] = {k: (min(v) if v else None) for k, v in times.items()}
    res["seconds_all"] = times
    res["calls_per_sample"] = k_of
    res["cpu_seconds_all"] = cpu
    cmed = {k: (statistics.median(v) if v else None) for k, v in cpu.items()}
    res["cpu_mbps"] = {k: mbps(res.get("gguf_py_weights", 0) if k == "gguf_py" else n, s) for k, s in cmed.items()}
    res["mbps"] = {k: mbps(res.get("gguf_py_weights", 0) if k == "gguf_py" else n, s) for k, s in med.items()}
    m = res["mbps"]
    res["ratio"] = {
        "ours_vs_ggml_1t": ratio(m["ours_1t"], m["ggml_1t"]),
        "ours_vs_ggml_nt": ratio(m["ours_nt"], m["ggml_nt"]),
        "ours_1t_vs_gguf_py": ratio(m["ours_1t"], m["gguf_py"]),
        "ours_nt_vs_gguf_py": ratio(m["ours_nt"], m["gguf_py"]),
        "cpu_ours_vs_ggml_1t": ratio(res["cpu_mbps"]["ours_1t"], res["cpu_mbps"]["ggml_1t"]),
        "cpu_ours_vs_gguf_py": ratio(res["cpu_mbps"]["ours_1t"], res["cpu_mbps"]["gguf_py"]),
    }
    return res


# ---------------------------------------------------------------------------------------------- report
def machine_facts() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "numpy": np.__version__,
            "loadavg_start": os.getloadavg(), "git_head": git("rev-parse", "--short", "HEAD"),
            "native_dirty": git("status", "--porcelain", "--", "native"),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def fmt(v: float | None, spec: str = ".0f", na: str = "–") -> str:
    return na if v is None else format(v, spec)


def table(results: list[dict], nthreads: int) -> str:
    hdr = ["type", "path", "ours 1T", "ggml 1T", "ours/ggml 1T", "(CPU time)", f"ours {nthreads}T", f"ggml {nthreads}T",
           f"ours/ggml {nthreads}T", "identical", "gguf-py", "ours 1T/gguf-py", f"ours {nthreads}T/gguf-py", "load"]
    lines = ["| " + " | ".join(hdr) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * 7 + ["---"] + ["---:"] * 4) + "|"]
    for r in results:
        m, q = r["mbps"], r["ratio"]
        na = "ours_error" in r
        gp = r.get("gguf_py", "") if m["gguf_py"] is None else fmt(m["gguf_py"], ".1f")
        if r["path"] == "imatrix":
            gp = "no imatrix path" if r["type"] in {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"} else "–"
        row = [r["type"], r["path"],
               "not available" if na else fmt(m["ours_1t"]), fmt(m["ggml_1t"]),
               "–" if na else fmt(q["ours_vs_ggml_1t"], ".2f") + "×",
               "–" if na else fmt(q["cpu_ours_vs_ggml_1t"], ".2f") + "×",
               "not available" if na else fmt(m["ours_nt"]), fmt(m["ggml_nt"]),
               "–" if na else fmt(q["ours_vs_ggml_nt"], ".2f") + "×",
               r["identical"], gp,
               fmt(q["ours_1t_vs_gguf_py"], ".0f") + ("×" if q["ours_1t_vs_gguf_py"] else ""),
               fmt(q["ours_nt_vs_gguf_py"], ".0f") + ("×" if q["ours_nt_vs_gguf_py"] else ""),
               "%.1f→%.1f" % tuple(r["loadavg_1min"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, default="smollm2")
    ap.add_argument("--tensor", default="model.layers.{i}.mlp.down_proj.weight",
                    help="safetensors name pattern; {i} = layer index (rows must be a multiple of 256 wide)")
    ap.add_argument("--layers", type=int, help="how many layers' tensors to stack (default: 8 full, 2 --quick)")
    ap.add_argument("--types", nargs="+", default=TYPES, metavar="TYPE")
    ap.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="N for the NT comparison (default nproc)")
    ap.add_argument("--repeat", type=int, help="timed runs per encoder, median reported (default 5 full, 3 --quick)")
    ap.add_argument("--gguf-py-weights", type=int, default=0,
                    help="time gguf-py on a slice of about this many weights (whole rows) if it is too slow on all "
                         "of them; MB/s is normalized either way (default 0: the same full matrix)")
    ap.add_argument("--quick", action="store_true", help="fast run: 2 layers, 3 repeats")
    ap.add_argument("--json", type=Path, help="also write all results (incl. every timing) here")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    layers = a.layers or (2 if a.quick else 8)
    repeat = a.repeat or (3 if a.quick else 5)

    from qrealign_gguf.formats.types import qtype
    from qrealign_gguf.llamacpp import find_llama

    llama = find_llama()
    ggml = GGML(llama.lib_dir)
    x, names, mdir = load_weights(a.model, layers, a.tensor)
    rows, cols = x.shape
    rng = np.random.default_rng(a.seed)
    im_vec = rng.lognormal(0.0, 1.0, cols).astype(np.float32)  # positive, heavy-ish tail like mean(act^2)
    gg_rows = max(1, min(rows, a.gguf_py_weights // cols)) if a.gguf_py_weights > 0 else rows
    facts = machine_facts()
    cmd = " ".join(sys.argv)

    print(f"# encoder throughput  {facts['date']}", file=sys.stderr)
    print(f"data: {a.model} {a.tensor} x{layers} -> {rows}x{cols} = {x.size / 1e6:.2f}M weights "
          f"({x.nbytes / 1e6:.1f} MB f32); gguf-py slice {gg_rows} rows; threads N={a.threads}; repeat={repeat}; "
          f"cpu={facts['cpu']} nproc={facts['nproc']} load={facts['loadavg_start']}", file=sys.stderr)

    results = []
    with ThreadPoolExecutor(max_workers=a.threads) as pool:
        for name in a.types:
            t = qtype(name)
            for path in a.paths:
                im = im_vec if path == "imatrix" else None
                r = bench_one(t, path, x, im, ggml, pool, a.threads, repeat, gg_rows)
                results.append(r)
                m = r["mbps"]
                print(f"  {name:7s} {path:8s} ours1T={fmt(m['ours_1t'])} ggml1T={fmt(m['ggml_1t'])} "
                      f"oursNT={fmt(m['ours_nt'])} ggmlNT={fmt(m['ggml_nt'])} gguf-py={fmt(m['gguf_py'], '.1f')} "
                      f"MB/s identical={r['identical']}" + (f"  [{r['ours_error']}]" if "ours_error" in r else ""),
                      file=sys.stderr, flush=True)
    facts["loadavg_end"] = os.getloadavg()

    print(table(results, a.threads))
    print(f"\nMB/s of float32 input (Mweights/s = MB/s / 4); median of {repeat}; data {rows}x{cols} "
          f"({x.size / 1e6:.2f}M weights, {a.model} {a.tensor} layers 0..{layers - 1}); gguf-py on "
          f"{'all' if gg_rows == rows else f'the first {gg_rows}'} rows; N={a.threads}; load avg {facts['loadavg_start'][0]:.2f} -> {facts['loadavg_end'][0]:.2f}.\n"
          "(CPU time) = ours/ggml 1T from the calling thread's CPU time instead of wall time: robust to other "
          "processes on the cores. load = 1-min load average before -> after the row (> nproc: contended).")
    for r in results:
        if "ours_error" in r:
            print(f"- {r['type']} {r['path']}: not available ({r['ours_error']})")
        elif not r.get("ours_nt_matches_1t", True):
            print(f"- {r['type']} {r['path']}: ours threads={a.threads} output differs from threads=1!")
        if not r["ggml_nt_matches_1t"]:
            print(f"- {r['type']} {r['path']}: ggml chunked output differs from one call!")
        if r["mbps"]["gguf_py"] is not None:
            print(f"- {r['type']} reference: ggml 1T / gguf-py = {ratio(r['mbps']['ggml_1t'], r['mbps']['gguf_py']):.1f}×;"
                  f" CPU time: ours 1T / gguf-py = {r['ratio']['cpu_ours_vs_gguf_py']:.1f}×"
                  f" (gguf-py output vs ggml: {r['gguf_py_identical']})")
        elif r.get("gguf_py_identical", "yes") != "yes":
            print(f"- {r['type']} gguf-py vs ggml: {r['gguf_py_identical']}")

    if a.json:
        a.json.write_text(json.dumps({
            "command": cmd, "machine": facts, "ggml_lib": str(ggml.lib_path),
            "data": {"model": a.model, "dir": mdir, "tensors": names, "shape": [rows, cols],
                     "gguf_py_rows": gg_rows, "imatrix": "lognormal(0,1) per column, seed %d" % a.seed},
            "threads": a.threads, "repeat": repeat, "results": results}, indent=1, default=str))
        print(f"\nwrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Results JSON -> markdown tables, PNG plots, and the README's "Results" section.

    python -m benchmarks.report [results.json]            # markdown + plots beside the JSON
    python -m benchmarks.report --readme [results.json]   # also rewrite README.md's results

Tables: one block per case (suite, name), each implementation beside its peers with
its median time and spread, TFLOP/s and % of the measured matmul ceiling, GB/s and % of
the measured copy bandwidth, and its speed-up over the case's main peer.

Plots follow the hints suites put in ``Result.extra`` (benchmarks/README.md):
``plot`` (file/figure id), ``x`` (a key of ``shape`` or ``extra``), optional ``y``
("tflops", "gbps" or "time_ms"), ``series`` (default: impl), ``panel`` (one subplot
each), ``xscale``/``yscale`` ("log" or "linear"), ``plot_title``, ``xlabel``.

The README section is generated from the newest GPU results file, never typed by hand.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import sys

RESULTS_DIR = os.path.join("benchmarks", "results")
README_BEGIN, README_END = "<!-- results -->", "<!-- /results -->"

# The peer each suite's own rows are compared with, unless a row names one in extra["main_peer"];
# the first of these present (and without error) in a case wins.
MAIN_PEERS = {
    "attention": ("cudnn", "torch_flex", "torch_sdpa", "jax_pallas_mha", "xla_attention"),
    "selection": ("cudnn", "torch_flex", "torch_sdpa", "xla_attention"),
    "indexed": ("cudnn", "torch_flex", "xla_attention"),
    "gmm": ("ragged_dot", "torch_grouped_mm", "ragged_dot_mgpu"),
    "moe": ("torch_moe", "ragged_dot"),
    "tables": ("splash_mask_info", "splash_dynamic_mask_info"),
}
OURS_PREFIX = "sparse_jax"


def is_ours(row: dict) -> bool:
    return str(row.get("impl", "")).startswith(OURS_PREFIX)


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if "results" not in data:
        raise ValueError(f"{path} is not a benchmarks results file (no 'results')")
    data.setdefault("meta", {})
    return data


def cases(results: list[dict]) -> "collections.OrderedDict[tuple[str, str], list[dict]]":
    """Rows grouped by (suite, name), in first-seen order."""
    out: collections.OrderedDict = collections.OrderedDict()
    for r in results:
        out.setdefault((r.get("suite", "?"), r.get("name", "?")), []).append(r)
    return out


def _ok(r: dict) -> bool:
    return r.get("error") is None and bool(r.get("time_ms"))


def main_peer(rows: list[dict], suite: str, row: dict | None = None) -> dict | None:
    """The row ``row`` (default: the case as a whole) is compared with; None: no usable peer.

    A row may name its own in ``extra["main_peer"]`` (e.g. a jit-path row compared with
    the peer's jit path); otherwise the suite's MAIN_PEERS order, then the fastest peer.
    """
    by_impl = {r["impl"]: r for r in rows if _ok(r)}
    own = (row.get("extra") or {}).get("main_peer") if row is not None else None
    if own in by_impl:
        return by_impl[own]
    for impl in MAIN_PEERS.get(suite, ()):
        if impl in by_impl:
            return by_impl[impl]
    peers = [r for r in rows if _ok(r) and not is_ours(r)]
    return min(peers, key=lambda r: r["time_ms"]) if peers else None


def _ratio(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.0f}×" if x >= 100 else f"{x:.1f}×" if x >= 10 else f"{x:.2f}×"


def _fmt(x, spec=".2f", none="–"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _ms(t: float | None) -> str:
    if t is None:
        return "–"
    return f"{t:.3f}" if t < 1 else f"{t:.2f}" if t < 100 else f"{t:.0f}"


def _pct(v, ceiling):
    return None if v is None or not ceiling else 100.0 * v / ceiling


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _note(r: dict) -> str:
    if r.get("error"):
        err = str(r["error"]).strip().splitlines()
        if err and err[0].lower().startswith("skipped"):
            return err[0][:200]
        return "error: " + (err[-1] if err else "?")[:160]
    extra = r.get("extra") or {}
    return str(extra.get("note", ""))


def _ceilings(meta: dict) -> tuple[float | None, float | None]:
    c = meta.get("ceilings") or {}
    return c.get("matmul_tflops_bf16"), c.get("copy_gbps")


def case_table(rows: list[dict], suite: str, meta: dict) -> list[str]:
    mm, bw = _ceilings(meta)
    peer = main_peer(rows, suite)
    head = f"speed-up vs {peer['impl']}" if peer else "speed-up vs peer"
    lines = [f"| impl | time ms (spread) | TFLOP/s | % matmul | GB/s | % copy | {head} | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (not is_ours(r), r.get("time_ms") is None, r.get("time_ms") or 0)):
        spread = f" (±{100 * r['spread'] / 2:.0f}%)" if r.get("spread") is not None and _ok(r) else ""
        own = main_peer(rows, suite, r)
        ratio = _ratio(own["time_ms"] / r["time_ms"]) if own and _ok(r) else "–"
        if own and peer and own is not peer and _ok(r):
            ratio += f" vs {own['impl']}"
        name = f"**{r['impl']}**" if is_ours(r) else r["impl"]
        lines.append("| " + " | ".join(_cell(c) for c in (
            name, _ms(r.get("time_ms")) + spread, _fmt(r.get("tflops"), ".1f"), _fmt(_pct(r.get("tflops"), mm), ".0f"),
            _fmt(r.get("gbps"), ".0f"), _fmt(_pct(r.get("gbps"), bw), ".0f"), ratio, _note(r))) + " |")
    return lines


def _header(meta: dict) -> list[str]:
    mm, bw = _ceilings(meta)
    versions = ", ".join(f"{k} {meta[k]}" for k in ("jax", "jaxlib", "triton", "torch", "flax", "python") if meta.get(k))
    out = [f"Device: **{meta.get('device', '?')}** ({meta.get('platform', '?')}, sparse_jax backend "
           f"`{meta.get('backend', '?')}`{', quick sizes' if meta.get('quick') else ''}), {meta.get('date', '?')}.",
           "", f"Versions: {versions}.", ""]
    if mm or bw:
        out += [f"Measured ceilings in the same process: matmul **{_fmt(mm, '.4g')} TFLOP/s** (bf16, XLA), "
                f"copy **{_fmt(bw, '.4g')} GB/s** (read + write).", ""]
    return out


def markdown(data: dict) -> str:
    """The full report: header, suite status, one table per case."""
    meta, results = data["meta"], data["results"]
    lines = ["# Benchmark results", ""] + _header(meta)
    lines += ["Times are medians over fresh random inputs after warm-up (spread: half the p10–p90 range). "
              "FLOPs count computed blocks only; speed-up is the main peer's time over this row's (>1: faster).", ""]
    suites = meta.get("suites") or {}
    if suites:
        lines += ["| suite | status | results | errors | skipped | seconds | budget s |", "|---|---|---|---|---|---|---|"]
        for name, st in suites.items():
            lines.append(f"| {name} | {st.get('status')} | {st.get('n_results', 0)} | {st.get('n_errors', 0)} | "
                         f"{st.get('n_skipped', 0)} | {_fmt(st.get('seconds'), '.0f')} | "
                         f"{_fmt(st.get('budget_s'), '.0f')} |")
        lines.append("")
        for name, st in suites.items():
            if st.get("status") in ("error", "timeout") and st.get("error"):
                lines += [f"<details><summary>{name}: {st['status']}</summary>", "", "```",
                          str(st["error"]).strip(), "```", "</details>", ""]
    current = None
    for (suite, name), rows in cases(results).items():
        if suite != current:
            lines += [f"## {suite}", ""]
            current = suite
        shape = rows[0].get("shape") or {}
        desc = ", ".join(f"{k}={v}" for k, v in shape.items())
        lines += [f"### {name}", "", f"`{desc}`" if desc else "", ""] + case_table(rows, suite, meta) + [""]
    return "\n".join(lines)


# -- plots --------------------------------------------------------------------------------------
def _value(r: dict, key: str):
    if key in (r.get("shape") or {}):
        return r["shape"][key]
    extra = r.get("extra") or {}
    if key in extra:
        return extra[key]
    return r.get(key)


def plot_groups(results: list[dict]) -> "collections.OrderedDict[str, list[dict]]":
    """Rows with plot hints (and a time), grouped by extra['plot']."""
    out: collections.OrderedDict = collections.OrderedDict()
    for r in results:
        extra = r.get("extra") or {}
        if extra.get("plot") and extra.get("x") and _ok(r):
            out.setdefault(str(extra["plot"]), []).append(r)
    return out


def _metric(r: dict) -> str:
    y = (r.get("extra") or {}).get("y")
    if y:
        return y
    return "tflops" if r.get("tflops") else "gbps" if r.get("gbps") else "time_ms"


_YLABEL = {"tflops": "TFLOP/s", "gbps": "GB/s", "time_ms": "time (ms)"}


def plot(rows: list[dict], path: str, meta: dict) -> str:
    """One PNG for one plot id: a subplot per panel, a line per series."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: collections.OrderedDict = collections.OrderedDict()
    for r in rows:
        panels.setdefault(str((r.get("extra") or {}).get("panel", "")), []).append(r)
    n = len(panels)
    cols = min(n, 3)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    mm, bw = _ceilings(meta)
    first = rows[0].get("extra") or {}
    for ax, (panel, prow) in zip(axes.flat, panels.items()):
        metric = _metric(prow[0])
        series: collections.OrderedDict = collections.OrderedDict()
        for r in prow:
            label = str((r.get("extra") or {}).get("series", r["impl"]))
            y = r.get(metric) if metric != "time_ms" else r.get("time_ms")
            x = _value(r, first["x"])
            if y is None or x is None:
                continue
            series.setdefault(label, []).append((x, y))
        xs_all = []
        for label, pts in series.items():
            pts.sort(key=lambda p: (isinstance(p[0], str), p[0]))
            xs, ys = zip(*pts)
            xs_all += list(xs)
            style = "-o" if label.startswith(OURS_PREFIX) else "--s"
            ax.plot(xs, ys, style, label=label, markersize=4, linewidth=2 if label.startswith(OURS_PREFIX) else 1)
        ceiling = mm if metric == "tflops" else bw if metric == "gbps" else None
        if ceiling:
            ax.axhline(ceiling, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"measured {'matmul' if metric == 'tflops' else 'copy'} {ceiling:.0f}",
                        (0.01, ceiling), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                        va="bottom")
        numeric = [x for x in xs_all if isinstance(x, (int, float))]
        xscale = first.get("xscale")
        if xscale is None:
            xscale = "log" if numeric and min(numeric) > 0 and max(numeric) / min(numeric) > 8 else "linear"
        if xscale == "log" and numeric and min(numeric) > 0:
            ax.set_xscale("log", base=2)
        yscale = first.get("yscale") or ("log" if metric == "time_ms" else "linear")
        ax.set_yscale(yscale)
        ax.set_xlabel(first.get("xlabel", first["x"]))
        ax.set_ylabel(_YLABEL.get(metric, metric))
        if panel:
            ax.set_title(panel, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{first.get('plot_title', first['plot'])} — {meta.get('device', '')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plots(data: dict, out_dir: str) -> list[str]:
    paths = []
    for pid, rows in plot_groups(data["results"]).items():
        os.makedirs(out_dir, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", pid)
        try:
            paths.append(plot(rows, os.path.join(out_dir, safe + ".png"), data["meta"]))
        except Exception as e:  # noqa: BLE001 - one bad plot must not lose the report
            print(f"plot {pid!r} failed: {e!r}", file=sys.stderr)
    return paths


def write(json_path: str, *, make_plots: bool = True) -> tuple[str, list[str]]:
    """Markdown ``<stem>.md`` and plots ``<stem>/<plot>.png`` beside ``json_path``."""
    data = load(json_path)
    stem = os.path.splitext(json_path)[0]
    pngs = plots(data, stem) if make_plots else []
    md = markdown(data)
    if pngs:
        rel = os.path.basename(stem)
        md += "\n## Plots\n\n" + "\n".join(f"![{os.path.basename(p)}]({rel}/{os.path.basename(p)})" for p in pngs) + "\n"
    with open(stem + ".md", "w") as f:
        f.write(md)
    return stem + ".md", pngs


# -- README -------------------------------------------------------------------------------------
def latest_results(results_dir: str = RESULTS_DIR, platform: str = "gpu") -> str | None:
    """The newest results JSON recorded on ``platform`` (by the date in its meta, then name)."""
    best = None
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        try:
            meta = load(path)["meta"]
        except (ValueError, OSError, json.JSONDecodeError):
            continue
        if meta.get("platform") != platform or meta.get("quick"):
            continue
        key = (str(meta.get("date", "")), os.path.basename(path))
        if best is None or key > best[0]:
            best = (key, path)
    return None if best is None else best[1]


def summary_table(data: dict, max_rows: int = 80) -> list[str]:
    """One row per case: our best implementation against the main peer and the best peer."""
    meta = data["meta"]
    mm, bw = _ceilings(meta)
    lines = ["| suite | case | sparse_jax ms | TFLOP/s (% matmul) | GB/s (% copy) | main peer | peer ms | "
             "speed-up | best peer |", "|---|---|---|---|---|---|---|---|---|"]
    n = 0
    all_cases = cases(data["results"])
    for (suite, name), rows in all_cases.items():
        ours = [r for r in rows if is_ours(r) and _ok(r) and (r.get("extra") or {}).get("summary", True)]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["time_ms"])
        peer = main_peer(rows, suite, best)
        others = [r for r in rows if _ok(r) and not is_ours(r)]
        fastest = min(others, key=lambda r: r["time_ms"]) if others else None
        tf = f"{_fmt(best.get('tflops'), '.1f')} ({_fmt(_pct(best.get('tflops'), mm), '.0f')}%)" \
            if best.get("tflops") else "–"
        gb = f"{_fmt(best.get('gbps'), '.0f')} ({_fmt(_pct(best.get('gbps'), bw), '.0f')}%)" if best.get("gbps") else "–"
        ratio = _ratio(peer["time_ms"] / best["time_ms"]) if peer else "–"
        fp = f"{fastest['impl']} ({_ms(fastest['time_ms'])})" if fastest else "–"
        lines.append("| " + " | ".join(_cell(c) for c in (
            suite, name, _ms(best["time_ms"]), tf, gb, peer["impl"] if peer else "–",
            _ms(peer["time_ms"]) if peer else "–", ratio, fp)) + " |")
        n += 1
        if n >= max_rows:
            lines.append(f"| … | {len(all_cases) - n} more cases in the full report | | | | | | | |")
            break
    return lines


def readme_section(data: dict, json_path: str, pngs: list[str], readme_dir: str) -> str:
    meta = data["meta"]
    rel = lambda p: os.path.relpath(p, readme_dir).replace(os.sep, "/")  # noqa: E731
    md_path = os.path.splitext(json_path)[0] + ".md"
    lines = [README_BEGIN, "", "_Generated by `python -m benchmarks.report --readme` from "
             f"[`{rel(json_path)}`]({rel(json_path)}) (full tables: [`{rel(md_path)}`]({rel(md_path)})); "
             "do not edit by hand._", ""]
    lines += _header(meta)
    lines += ["Speed-up is the main peer's median time over sparse_jax's (>1: sparse_jax is faster); "
              "FLOPs count computed blocks only.", ""]
    lines += summary_table(data) + [""]
    for p in pngs:
        lines.append(f"![{os.path.splitext(os.path.basename(p))[0]}]({rel(p)})")
    lines += ["", README_END]
    return "\n".join(lines)


def rewrite_readme(readme_path: str, section: str) -> None:
    """Replace the text between the results markers (markers included) with ``section``."""
    with open(readme_path) as f:
        text = f.read()
    i, j = text.find(README_BEGIN), text.find(README_END)
    if i < 0 or j < i:
        raise ValueError(f"{readme_path} has no {README_BEGIN} ... {README_END} markers")
    text = text[:i] + section + text[j + len(README_END):]
    with open(readme_path, "w") as f:
        f.write(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="?", help="results JSON (default: the newest GPU results in benchmarks/results)")
    p.add_argument("--readme", action="store_true", help="rewrite the Results section of README.md")
    p.add_argument("--readme-path", default="README.md")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    path = args.json or latest_results(args.results_dir, "gpu")
    if path is None:
        raise SystemExit(f"no GPU results JSON in {args.results_dir}; pass one explicitly")
    md_path, pngs = write(path, make_plots=not args.no_plots)
    print(md_path)
    for q in pngs:
        print(q)
    if args.readme:
        section = readme_section(load(path), path, pngs, os.path.dirname(os.path.abspath(args.readme_path)))
        rewrite_readme(args.readme_path, section)
        print(f"rewrote the results section of {args.readme_path}")


if __name__ == "__main__":
    main()

"""Writes the study's results: ``results.json``, ``summary.md`` and two PNG plots (with matplotlib).

Rows are plain dicts (see :mod:`models.study`); the plots are accuracy vs density
(fraction of the causal blocks computed) and attention time vs density, one line
per family.
"""

from __future__ import annotations

import importlib.util
import json
import os

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _fmt(x, spec=".3f"):
    if x is None:
        return "–"
    text = format(x, spec) if isinstance(x, float) else str(x)
    return " ".join(text.split()).replace("|", "\\|")  # one table cell: no newlines, escaped pipes


def _table(rows, columns) -> list[str]:
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), f) for _, k, f in columns) + " |")
    return lines


SWAP_COLUMNS = [("variant", "name", ""), ("density vs causal", "density_vs_causal", ".3f"),
                ("MQAR acc", "acc_mqar", ".3f"), ("needle acc", "acc_needle", ".3f"),
                ("mean acc", "accuracy", ".3f"), ("attn ms", "time_ms", ".3f"), ("speedup vs dense", "speedup", ".2f"),
                ("note", "note", "")]
NATIVE_COLUMNS = [("model", "name", ""), ("params", "params", ",d"), ("steps", "steps", ""),
                  ("train s", "train_s", ".0f"),
                  ("final loss", "final_loss", ".3f"), ("MQAR acc", "acc_mqar", ".3f"),
                  ("needle acc", "acc_needle", ".3f"), ("density vs causal", "density_vs_causal", ".3f"),
                  ("note", "note", "")]


def _grouped(rows):
    """Rows grouped by family (in order of first appearance), order within a family kept."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    return sorted(rows, key=lambda r: families.index(r["family"]))


def _answers(result) -> str:
    counts = next((r["answers"] for r in result["swaps"] if r.get("answers")), None)
    if not counts:
        return ""
    return (" Accuracy per variant is over " + ", ".join(f"{n} {k} answers" for k, n in counts.items())
            + " (binomial noise: about 0.5/sqrt(n)).")


def _warm_start(result: dict) -> str:
    stages = result.get("warm_start") or []
    if isinstance(stages, dict):  # results written before chains
        stages = [stages]
    return "".join(f"{'first' if i == 0 else 'then'} at {w['seq_len']} tokens for {w['steps']} steps "
                   f"({w['seconds']:.0f} s, the {w['preset']} preset), " for i, w in enumerate(stages)) + (
                       "then " if stages else "")


def markdown(result: dict) -> str:
    p, env = result["preset"], result["env"]
    dense = result["dense_training"]
    lines = [
        f"# Sparse-attention accuracy study ({p['name']} preset)",
        "",
        f"Device: {env['device']} · backend `{env['backend']}` · jax {env['jax']} · total {result['seconds']:.0f} s",
        "",
        f"A dense {p['size']} Llama-style model ({dense['params']:,} params) was trained on MQAR + needle retrieval "
        f"{_warm_start(result)}at {p['seq_len']} tokens for {dense['steps']} steps ({dense['seconds']:.0f} s; final answer loss "
        f"{dense['final_loss']:.3f}); its attention was then swapped for each method below, weights unchanged. "
        f"Density counts computed (query block, key block) pairs of {p['block_size']} tokens relative to causal "
        f"attention, averaged over layers and eval batches (indexed/DSA: attended (query, key) pairs, token level). "
        f"Attention time: one layer forward, batch "
        f"{p['speed_batch']} x {p['speed_len']} tokens, {p['dtype']}.{_answers(result)}",
        "",
        "## Swapped into the trained dense model",
        "",
        *_table(_grouped(result["swaps"]), SWAP_COLUMNS),
    ]
    if result["native"]:
        lines += ["", "## Trained natively", "", *_table(result["native"], NATIVE_COLUMNS)]
    notes = list(result["notes"]) + ([] if HAVE_MATPLOTLIB else ["matplotlib is not installed: no plots"])
    if notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _plot(rows, x_key, y_key, ylabel, title, path, logy=False, reference=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    families = sorted({r["family"] for r in rows if r.get(x_key) is not None and r.get(y_key) is not None})
    for fam in families:
        pts = sorted((r[x_key], r[y_key]) for r in rows
                     if r["family"] == fam and r.get(x_key) is not None and r.get(y_key) is not None)
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="*" if fam == "dense" else "o", ms=10 if fam == "dense" else 5,
                linestyle="none" if fam == "dense" else "-", label=fam)
    if reference is not None:
        ax.axhline(reference, color="gray", lw=0.8, ls="--")
    if not families:
        ax.text(0.5, 0.5, "no data (see summary.md notes)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("density (fraction of causal blocks computed)")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if families:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out_dirs: list[str]) -> list[str]:
    """Write results.json, summary.md and the plots into every directory of ``out_dirs``."""
    written = []
    swaps = result["swaps"]
    dense_acc = next((r.get("accuracy") for r in swaps if r["family"] == "dense"), None)
    for d in out_dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(d, "summary.md"), "w") as f:
            f.write(markdown(result))
        written += [os.path.join(d, "results.json"), os.path.join(d, "summary.md")]
        if not HAVE_MATPLOTLIB:
            continue
        tag = f"{result['preset']['name']} preset, S={result['preset']['seq_len']}"
        _plot(swaps, "density_vs_causal", "accuracy", "exact-match accuracy (mean of tasks)",
              f"Accuracy vs density ({tag})", os.path.join(d, "accuracy_vs_density.png"), reference=dense_acc)
        _plot(swaps, "speed_density_vs_causal", "time_ms", "attention forward (ms)",
              f"Speed vs density ({result['env']['backend']}, S={result['preset']['speed_len']})",
              os.path.join(d, "speed_vs_density.png"), logy=True)
        written += [os.path.join(d, n) for n in ("accuracy_vs_density.png", "speed_vs_density.png")]
    return written

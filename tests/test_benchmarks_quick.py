"""The benchmark runner, report and peers, at smoke sizes on the CPU.

* ``python -m benchmarks.run --backend cpu --quick --suite tables,<missing>`` in a
  subprocess: JSON and markdown written and parseable, the missing suite reported.
* run_suite on fake suites: one that raises, one that runs past its budget (results
  recorded before the failure are kept).
* report.py on a synthetic results file: tables beside peers with speed-ups, plots,
  the README section rewritten between its markers (on a temp copy).
* FLOP counting from block masks; the peers never raise (GPU-only peers return errors).
* With torch (CUDA, or the CPU with SPARSE_JAX_SLOW=1): FlexAttention on the converted
  block mask matches sparse_jax's reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparse_jax
from benchmarks import flops, peers, report, run
from benchmarks.timing import Result
from sparse_jax import masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # plots are optional (the GPU image may lack matplotlib): the report still works without
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


def test_run_cli_quick_tables(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--backend", "cpu", "--quick", "--suite", "tables,no_such_suite",
         "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jsons = list(tmp_path.glob("*.json"))
    assert len(jsons) == 1, list(tmp_path.iterdir())
    data = json.loads(jsons[0].read_text())
    meta = data["meta"]
    assert meta["platform"] == "cpu" and meta["backend"] == "xla" and meta["quick"] is True
    assert meta["ceilings"]["matmul_tflops_bf16"] > 0 and meta["ceilings"]["copy_gbps"] > 0
    assert meta["suites"]["no_such_suite"]["status"] == "missing"
    assert meta["suites"]["tables"]["status"] == "ok"
    rows = [r for r in data["results"] if r["suite"] == "tables"]
    impls = {r["impl"] for r in rows}
    assert {"sparse_jax_host", "sparse_jax_host_cached", "sparse_jax_jit", "splash_mask_info"} <= impls
    assert {r["shape"]["S"] for r in rows} == {8192, 16384}
    ours = [r for r in rows if r["impl"].startswith("sparse_jax")]
    assert all(r["error"] is None and r["time_ms"] > 0 for r in ours), [r for r in ours if r["error"]]
    md = jsons[0].with_suffix(".md").read_text()
    assert "## tables" in md and "sparse_jax_host" in md and "speed-up vs splash_mask_info" in md
    if HAVE_MPL:
        assert (tmp_path / jsons[0].stem / "block_tables.png").stat().st_size > 1000


def _fake_suite(monkeypatch, name, fn):
    mod = types.ModuleType(f"benchmarks.{name}")
    mod.run = fn
    monkeypatch.setitem(sys.modules, f"benchmarks.{name}", mod)


def _ctx(tmp_path):
    return run.Context(backend="xla", platform="cpu", quick=True, ceilings={}, out=str(tmp_path))


def test_run_suite_error_and_timeout_keep_recorded_results(tmp_path, monkeypatch):
    def raising(ctx):
        ctx.record(Result("fake", "a", "sparse_jax", {}, 1.0))
        raise ValueError("boom")

    def slow(ctx):
        ctx.record(Result("fake", "b", "sparse_jax", {}, 1.0))
        time.sleep(5)
        return [Result("fake", "c", "sparse_jax", {}, 1.0)]

    def fine(ctx):
        r = ctx.record(Result("fake", "d", "sparse_jax", {}, 1.0))
        return [r, {"suite": "fake", "name": "e", "impl": "peer", "shape": {}, "time_ms": 2.0}]

    _fake_suite(monkeypatch, "_t_raise", raising)
    _fake_suite(monkeypatch, "_t_slow", slow)
    _fake_suite(monkeypatch, "_t_fine", fine)
    ctx = _ctx(tmp_path)
    rs, st = run.run_suite("_t_raise", ctx, None)
    assert st["status"] == "error" and "boom" in st["error"] and [r.name for r in rs] == ["a"]
    rs, st = run.run_suite("_t_slow", ctx, 1.0)
    assert st["status"] == "timeout" and [r.name for r in rs] == ["b"]
    rs, st = run.run_suite("_t_fine", ctx, None)
    assert st["status"] == "ok" and [r.name for r in rs] == ["d", "e"] and rs[1].impl == "peer"
    rs, st = run.run_suite("_t_does_not_exist", ctx, None)
    assert st["status"] == "missing" and rs == []


def _synthetic(tmp_path, platform="gpu", date="2030-01-02 03:04:05", quick=False):
    def res(name, impl, ms, tflops_work=None, err=None, **extra):
        r = Result("attention", name, impl, {"S": int(name[2:]), "density": 0.5}, ms,
                   flops=tflops_work, spread=0.1, extra=extra, error=err)
        return r.to_json()
    results = []
    for S, ours, peer in ((1024, 1.0, 2.0), (2048, 3.0, 4.5)):
        hint = dict(plot="attention_seq", x="S")
        results += [res(f"S={S}", "sparse_jax/triton", ours, 1e12, **hint),
                    res(f"S={S}", "cudnn", peer, 2e12, **hint),
                    res(f"S={S}", "torch_flex", None, err="Traceback (most recent call last):\n  File x\nRuntimeError: no torch")]
    results.append(Result("gmm", "M=64", "sparse_jax", {"M": 64}, 0.5, bytes=1e9, extra={"plot": "g", "x": "M",
                                                                                        "y": "gbps"}).to_json())
    results.append(Result("gmm", "M=64", "ragged_dot", {"M": 64}, 1.5, bytes=1e9).to_json())
    meta = {"device": "NVIDIA H100 80GB HBM3", "platform": platform, "backend": "triton", "jax": "0.11.2",
            "torch": "2.11.0", "date": date, "quick": quick,
            "ceilings": {"matmul_tflops_bf16": 700.0, "copy_gbps": 2800.0},
            "suites": {"attention": {"status": "ok", "n_results": 6, "n_errors": 2, "seconds": 3.0},
                       "moe": {"status": "error", "error": "Traceback\nValueError: bad", "seconds": 1.0}}}
    path = tmp_path / f"{date[:10]}_{platform}.json"
    path.write_text(json.dumps({"meta": meta, "results": results}))
    return path


def test_report_markdown_and_plots(tmp_path):
    path = _synthetic(tmp_path)
    md_path, pngs = report.write(str(path))
    md = open(md_path).read()
    assert "NVIDIA H100" in md and "matmul **700 TFLOP/s**" in md and "copy **2800 GB/s**" in md
    assert "speed-up vs cudnn" in md
    # sparse_jax/triton at S=1024: 1e12 flops in 1 ms = 1000 TFLOP/s... (synthetic), 2.00x faster than cudnn.
    line = next(ln for ln in md.splitlines() if ln.startswith("| **sparse_jax/triton** | 1.00"))
    assert "| 2.00× |" in line and "| 1000.0 | 143 |" in line
    assert "error: RuntimeError: no torch" in md
    assert "moe: error" in md and "ValueError: bad" in md
    gmm_line = next(ln for ln in md.splitlines() if ln.startswith("| **sparse_jax** | 0.500"))
    assert "| 2000 | 71 |" in gmm_line and "3.00×" in gmm_line  # GB/s and % of copy bandwidth
    if HAVE_MPL:
        assert sorted(os.path.basename(p) for p in pngs) == ["attention_seq.png", "g.png"]
        assert all(os.path.getsize(p) > 1000 for p in pngs)
        assert "![attention_seq.png](2030-01-02_gpu/attention_seq.png)" in open(md_path).read()


def test_report_readme_rewrite(tmp_path):
    results_dir = tmp_path / "benchmarks" / "results"
    results_dir.mkdir(parents=True)
    old = _synthetic(results_dir, date="2030-01-01 00:00:00")
    new = _synthetic(results_dir, date="2030-02-01 00:00:00")
    _synthetic(results_dir, platform="cpu", date="2031-01-01 00:00:00")
    _synthetic(results_dir, date="2032-01-01 00:00:00", quick=True).rename(results_dir / "zz_quick.json")
    assert report.latest_results(str(results_dir), "gpu") == str(new) != str(old)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n\n## Results (H100)\n\n<!-- results -->\nold text\n<!-- /results -->\n\ntail\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        report.main(["--readme", "--readme-path", "README.md", "--results-dir", "benchmarks/results"])
        first = readme.read_text()
        report.main(["--readme", "--readme-path", "README.md", "--results-dir", "benchmarks/results"])
    finally:
        os.chdir(cwd)
    text = readme.read_text()
    assert text == first  # idempotent
    assert text.startswith("# x\n\nintro\n\n## Results (H100)\n\n<!-- results -->") and text.endswith(
        "<!-- /results -->\n\ntail\n")
    assert "old text" not in text and "NVIDIA H100" in text and "2030-02-01" in text
    assert "| attention | S=1024 | 1.00 | 1000.0 (143%) |" in text and "cudnn" in text
    if HAVE_MPL:
        assert "![attention_seq](benchmarks/results/2030-02-01_gpu/attention_seq.png)" in text
        assert (results_dir / "2030-02-01_gpu" / "attention_seq.png").exists()
    with pytest.raises(ValueError, match="markers"):
        report.rewrite_readme(str(tmp_path / "benchmarks" / "results" / "2030-02-01_gpu.md"), "x")


def test_attention_flops_count_computed_blocks():
    S, b = 1000, 128  # ragged: 8 blocks, the last one 104 wide
    causal = sparse_jax.create_block_mask(masks.causal, None, None, S, S, b)
    lens = np.minimum(b, S - b * np.arange(8))
    expect = sum(lens[i] * lens[: i + 1].sum() for i in range(8))  # lower block triangle incl. diagonal
    assert flops.attention_pairs(causal, 2, 4) == 2 * 4 * expect
    full = sparse_jax.create_block_mask(masks.full, None, None, S, S, b)
    assert flops.attention_pairs(full, 1, 1) == S * S
    assert flops.attention_flops(full, 1, 1, 64) == 4 * S * S * 64
    assert flops.attention_flops(full, 1, 1, 64, backward=True) == 3.5 * 4 * S * S * 64
    sel = np.zeros((1, 2, 8, 8), bool)
    sel[0, 0, 0, 0] = sel[0, 1, 7, 7] = True
    bm = sparse_jax.BlockMask.from_block_bool(sel, S, S, b)  # per kv head, Hq = 4 -> 2 query heads each
    assert flops.attention_pairs(bm, 3, 4) == 3 * 2 * (b * b + 104 * 104)
    assert flops.gmm_flops(10, 20, 30, backward=True) == 3 * 2 * 10 * 20 * 30
    assert flops.moe_flops(8, 16, 32, 4, 2) == 6 * 8 * 2 * 16 * 32 + 2 * 8 * 16 * 4


def test_peers_never_raise():
    bm = sparse_jax.create_block_mask(masks.sliding_window(64, causal=True), None, None, 256, 256, 64)
    rs = peers.attention_peers(1, 256, 256, 2, 1, 32, jnp.float32, causal=True, block_mask=bm, name="case",
                               extra={"plot": "p", "x": "density"})
    assert [r.impl for r in rs] == ["cudnn", "xla_attention", "jax_pallas_mha", "jax_pallas_mgpu", "torch_sdpa",
                                    "torch_flex"]
    assert all(r.name == "case" and r.extra["plot"] == "p" for r in rs)
    by = {r.impl: r for r in rs}
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        assert by["cudnn"].error and "GPU" in by["cudnn"].error
    assert by["xla_attention"].error is None and by["xla_attention"].time_ms > 0
    assert by["xla_attention"].extra["series"] == "xla_attention (dense)"
    assert by["xla_attention"].flops == flops.attention_flops(flops.dense_block_mask(256, 256, True), 1, 2, 32)
    g = peers.gmm_peers(128, 32, 64, [50, 0, 78], jnp.float32)
    assert [r.impl for r in g] == ["ragged_dot", "ragged_dot_mgpu", "torch_grouped_mm"]
    assert g[0].error is None and g[0].flops == 2 * 128 * 32 * 64
    assert g[1].error or not on_cpu
    m = peers.torch_moe(64, 32, 64, 4, 2, jnp.bfloat16, router="zipf")
    assert [r.impl for r in m] == ["torch_moe"] and m[0].flops == flops.moe_flops(64, 32, 64, 4, 2)
    assert peers.router_bias(4, "zipf")[0] == 0 and np.all(np.diff(peers.router_bias(4, "zipf")) < 0)
    with pytest.raises(ValueError):
        peers.router_bias(4, "nope")


def test_flex_block_mask_conversion_matches_sparse_jax():
    torch = pytest.importorskip("torch")
    from benchmarks import peers_torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("SPARSE_JAX_SLOW") != "1":
        pytest.skip("compiling FlexAttention for the CPU takes minutes; set SPARSE_JAX_SLOW=1")
    S, B, Hq, Hkv, D = 200, 1, 4, 2, 16
    rng = np.random.default_rng(0)
    sel = rng.random((1, Hkv, 4, 4)) < 0.5
    sel[..., 0] = True
    ids = np.repeat(np.arange(3), [70, 60, 70])
    for bm in (sparse_jax.BlockMask.from_block_bool(sel, S, S, 64),
               sparse_jax.create_block_mask(masks.document(ids) & masks.sliding_window(50, causal=True),
                                            None, None, S, S, 64)):
        q, k, v = (rng.standard_normal((B, S, h, D)).astype(np.float32) for h in (Hq, Hkv, Hkv))
        ref = np.asarray(sparse_jax.block_sparse_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bm,
                                                           backend="xla"))
        # Eager flex ignores the block tables (it applies mask_mod only): compile, as the peer does.
        attn = peers_torch.flex_attention_fn(bm, Hq, Hkv, dev, compiled=True)
        t = lambda x: torch.from_numpy(x).permute(0, 2, 1, 3).contiguous().to(dev)  # noqa: E731
        out = attn(t(q), t(k), t(v)).permute(0, 2, 1, 3).cpu().numpy()
        np.testing.assert_allclose(out, ref, atol=2e-5 if dev == "cpu" else 2e-2)  # tf32 on GPU


def test_weighted_budget_shares_and_skips():
    suites = list(run.SUITES)
    shares = [run.share(480.0, 0.0, suites[i:]) for i in range(len(suites))]
    assert shares[-1] == 480.0  # the last suite gets all that is left
    w = [run.WEIGHTS[s] for s in suites]
    assert abs(shares[0] - 480.0 * w[0] / sum(w)) < 1e-9
    # The first suite finishing in 10 s of its share leaves time that flows to the later ones.
    assert run.share(480.0, 10.0, suites[1:]) > 480.0 * w[1] / sum(w)
    assert run.is_skip(Result("s", "n", "i", {}, None, error="skipped: too big"))
    assert not run.is_skip(Result("s", "n", "i", {}, None, error="ValueError: x"))
    assert not run.is_skip(Result("s", "n", "i", {}, 1.0))


def test_suite_plans_put_headline_cases_first():
    from benchmarks import gmm, moe
    p = gmm.plan(quick=False)
    assert [(c["model"], c["M"]) for c in p[:3]] == [("mixtral-8x7b", 512), ("mixtral-8x7b", 4096),
                                                    ("mixtral-8x7b", 32768)]
    assert sum(c["backward"] for c in p) == 1 and all(c["dist"] == "uniform" for c in p[:9])
    mp = moe.model_plan(moe.TOKENS, moe.ROUTERS, True, moe.BACKWARD_MIN_T, quick=False)
    assert mp[:6] == [(T, "uniform", False) for T in moe.TOKENS]
    assert all(b for _, _, b in mp[6:9]) and {r for _, r, _ in mp[9:]} == {"zipf"}

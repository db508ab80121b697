"""One entry point for every benchmark suite, each kernel timed beside its peers in one process.

    python -m benchmarks.run --backend {auto,gpu,tpu,cpu} [--suite attention,moe,...] [--quick]
                             [--out benchmarks/results] [--budget-s SECONDS]

Each suite is a module ``benchmarks/<suite>.py`` with ``run(ctx) -> list[Result]``
(see benchmarks/README.md). A suite that does not exist yet is reported as missing; one
that raises, or runs past its share of ``--budget-s``, is recorded with its error (and
whatever it had passed to ``ctx.record``) and the run goes on. After every suite the
results JSON ``<out>/<date>_<device>.json`` is rewritten, so a run killed from outside
still leaves what it finished; at the end the markdown report and the PNG plots are
written beside it (:mod:`benchmarks.report`).
"""

from __future__ import annotations

import os

# JAX would otherwise grab 75% of GPU memory up front and leave torch peers nothing.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

SUITES = ("attention", "moe", "gmm", "tables", "selection", "indexed", "roofline_tpu")
# Relative share of ``--budget-s`` per suite (about the seconds each needs in a ~480 s H100 run).
# A suite gets ``time left * its weight / weights of the suites still to run``, so time an
# early suite leaves unused flows to the later ones; unknown suites weigh DEFAULT_WEIGHT.
WEIGHTS = {"attention": 130, "moe": 110, "gmm": 85, "tables": 40, "selection": 85, "indexed": 45,
           "roofline_tpu": 20}
DEFAULT_WEIGHT = 60
SKIP_PREFIX = "skipped"  # a Result whose error starts with this is a recorded skip, not a failure
BACKEND_FOR_PLATFORM = {"gpu": "triton", "tpu": "mosaic_tpu", "cpu": "xla"}


class SuiteTimeout(Exception):
    """Raised inside a suite when it runs past its share of the time budget."""


@dataclasses.dataclass
class Context:
    """What a suite's ``run(ctx)`` gets.

    backend: the sparse_jax backend to time ("triton", "mosaic_tpu", "xla").
    platform: the JAX platform it runs on ("gpu", "tpu", "cpu").
    quick: small sizes (CPU smoke runs, tests).
    ceilings: measured matmul TFLOP/s and copy GB/s (``timing.ceilings()``).
    out: the output directory (suites may drop extra artefacts there).
    deadline: ``time.monotonic()`` value past which the suite is interrupted (None: no limit).
    """

    backend: str
    platform: str
    quick: bool
    ceilings: dict
    out: str
    deadline: float | None = None
    results: list = dataclasses.field(default_factory=list)
    _suite: str = ""

    def progress(self, iterable=None, **kwargs):
        """A tqdm progress bar over ``iterable`` (plain iteration if tqdm is missing)."""
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a bench dependency
            return iterable
        kwargs.setdefault("desc", self._suite)
        kwargs.setdefault("leave", False)
        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("dynamic_ncols", True)
        if not sys.stderr.isatty():
            kwargs.setdefault("mininterval", 10.0)
        return tqdm(iterable, **kwargs)

    def record(self, result) -> Any:
        """Keep ``result`` now, so it survives if the suite later raises or times out."""
        self.results.append(result)
        return result

    def time_left(self) -> float | None:
        """Seconds before this suite is interrupted (None: unlimited)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        print(f"[{self._suite}] {msg}", file=sys.stderr, flush=True)


def resolve_backend(name: str) -> tuple[str, str]:
    """--backend value -> (platform, sparse_jax backend); fails if that platform is absent."""
    import jax
    actual = jax.default_backend()
    platform = actual if name == "auto" else name
    if platform not in BACKEND_FOR_PLATFORM:
        raise SystemExit(f"--backend auto found platform {actual!r}, which has no sparse_jax kernel backend")
    if platform != "cpu" and platform != actual:
        raise SystemExit(f"--backend {name} asked for, but JAX's default platform is {actual!r}")
    return platform, BACKEND_FOR_PLATFORM[platform]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "device"


def _coerce(r, suite: str):
    """Results may come back as Result or dict; everything becomes a Result."""
    from benchmarks.timing import Result
    if isinstance(r, Result):
        return r
    if isinstance(r, dict):
        fields = {f.name for f in dataclasses.fields(Result)}
        return Result(**{k: v for k, v in r.items() if k in fields})
    return Result(suite, "?", "?", {}, None, error=f"suite returned a {type(r).__name__}, not a Result")


def _alarm(_signum, _frame):
    raise SuiteTimeout("suite ran past its time budget")


def run_suite(name: str, ctx: Context, budget_s: float | None) -> tuple[list, dict]:
    """Import and run one suite; returns (results, status record). Never raises."""
    start = time.monotonic()
    status: dict[str, Any] = {"status": "ok"}
    ctx.results, ctx._suite = [], name
    ctx.deadline = None if budget_s is None else start + budget_s
    returned = []
    try:
        mod = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"benchmarks.{name}":
            return [], {"status": "missing", "seconds": 0.0}
        return [], {"status": "error", "seconds": time.monotonic() - start, "error": _short_tb()}
    except Exception:  # noqa: BLE001 - a broken suite must not stop the run
        return [], {"status": "error", "seconds": time.monotonic() - start, "error": _short_tb()}
    if not callable(getattr(mod, "run", None)):
        return [], {"status": "error", "seconds": 0.0, "error": f"benchmarks/{name}.py has no run(ctx)"}
    use_alarm = budget_s is not None and hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max(budget_s, 1.0))
    try:
        returned = list(mod.run(ctx) or [])
    except SuiteTimeout as e:
        status = {"status": "timeout", "error": f"{e} ({budget_s:.0f} s)"}
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        status = {"status": "error", "error": _short_tb()}
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        gc.collect()  # drop device buffers a failed suite's frames still held
    seen = {id(r) for r in returned}
    results = [_coerce(r, name) for r in ctx.results if id(r) not in seen] + [_coerce(r, name) for r in returned]
    status["seconds"] = round(time.monotonic() - start, 2)
    status["n_results"] = len(results)
    skipped = [is_skip(r) for r in results]
    status["n_errors"] = sum(r.error is not None and not sk for r, sk in zip(results, skipped))
    status["n_skipped"] = sum(skipped)
    if budget_s is not None:
        status["budget_s"] = round(budget_s, 1)
    return results, status


def is_skip(r) -> bool:
    """A deliberate skip (too big for this device / budget), recorded with its reason."""
    return r.error is not None and str(r.error).lstrip().lower().startswith(SKIP_PREFIX)


def share(budget_s: float, elapsed_s: float, suites_left: list[str]) -> float:
    """Seconds for ``suites_left[0]``: what is left of the budget, split by weight."""
    w = [WEIGHTS.get(s, DEFAULT_WEIGHT) for s in suites_left]
    return max((budget_s - elapsed_s) * w[0] / sum(w), 1.0)


def _short_tb(limit: int = 4000) -> str:
    tb = traceback.format_exc()
    return tb if len(tb) <= limit else "..." + tb[-limit:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto", choices=("auto", "gpu", "tpu", "cpu"))
    p.add_argument("--suite", default=",".join(SUITES),
                   help=f"comma-separated suites (default: all of {', '.join(SUITES)})")
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke runs)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output directory")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total seconds for the suites; each gets a weighted share (run.WEIGHTS) of what is left")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    platform, backend = resolve_backend(args.backend)
    if platform == "cpu":
        import jax
        if jax.default_backend() != "cpu":  # time the CPU even on an accelerator host
            jax.config.update("jax_default_device", jax.devices("cpu")[0])
    from benchmarks import report, timing

    t_start = time.monotonic()
    env = timing.environment()
    print(f"benchmarks: {env['device']} ({platform}), sparse_jax backend {backend}, jax {env['jax']}, "
          f"suites {', '.join(suites)}{' (quick)' if args.quick else ''}", file=sys.stderr, flush=True)
    ceil = timing.ceilings(quick=args.quick)
    print(f"ceilings: matmul {ceil['matmul_tflops_bf16']:.1f} TFLOP/s (bf16), copy {ceil['copy_gbps']:.0f} GB/s",
          file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}_{_slug(env['device'])}"
    json_path = os.path.join(args.out, stem + ".json")
    ctx = Context(backend=backend, platform=platform, quick=args.quick, ceilings=ceil, out=args.out)
    meta = dict(env, backend=backend, quick=args.quick, ceilings=ceil, argv=sys.argv[1:], suites={})
    results: list = []
    for i, name in enumerate(suites):
        budget = None
        if args.budget_s is not None:
            budget = share(args.budget_s, time.monotonic() - t_start, suites[i:])
        rs, status = run_suite(name, ctx, budget)
        results.extend(rs)
        meta["suites"][name] = status
        line = f"suite {name}: {status['status']}"
        if status["status"] not in ("missing",):
            line += f", {status.get('n_results', 0)} results ({status.get('n_errors', 0)} with errors, " \
                    f"{status.get('n_skipped', 0)} skipped) in {status['seconds']:.1f} s" \
                    + (f" of {budget:.0f} s" if budget is not None else "")
        if status.get("error") and status["status"] != "ok":
            line += "\n  " + status["error"].strip().splitlines()[-1]
        print(line, file=sys.stderr, flush=True)
        meta["seconds"] = round(time.monotonic() - t_start, 2)
        timing.dump(results, json_path, **meta)
    md_path, pngs = report.write(json_path, make_plots=not args.no_plots)
    print(f"wrote {json_path}\n      {md_path}" + "".join(f"\n      {p}" for p in pngs), file=sys.stderr)
    return json_path


if __name__ == "__main__":
    main()

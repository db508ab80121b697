"""Shared plan of the decode expert kernels (GPU and TPU): work items, tiles, the reference math.

At decode (a token or a few, k routed experts each) the MoE layer is k weight streams per
token. The grouped path (sort by expert, group schedule, grouped matmuls, combine) spends
~20 kernel launches and two weight-streaming launches on it, each paying its own ramp and
tail. The decode kernel reads each assignment's expert id directly and does the whole
SwiGLU expert in **one launch**:

* a work item is (assignment a = t * k + j, F strip f of width ``tn``);
* it streams w_gate[id[a], :, strip] and w_up[id[a], :, strip] against x[t] (the full D
  contraction, so the strip's h = silu(g) * u is final inside the item: no cross-program
  reduction before the nonlinearity), rounds h to x.dtype (as the grouped path does), then
  streams the strip's rows of w_down[id[a]] and writes ``weights[a] * h_strip @ w_down[...]``
  -- a float32 partial of y[t] over that strip;
* y[t] = the sum of its k * F/tn partials (the GPU sums them in a fixed order after the
  launch, deterministic; a TPU core walks the strips in order and accumulates in VMEM).

No expert is read twice at one token (its k ids are distinct); at more tokens an expert
picked by two tokens is streamed twice, so the layer uses this only for a few tokens.

An assignment whose weight is 0 or whose id is outside [0, E) (a dropped or invalid one)
loads nothing and contributes 0.

Shapes: x [T, D], weights float32 [N = T k], ids int32 [N], w_gate/w_up
[E, D, F], w_down [E, F, D].
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.common import gmm_plan


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    """tn: F columns per work item (the strip). GPU only: tk, D rows per gate/up step; td, D
    columns per down step; num_warps, num_stages; programs_per_sm, the persistent programs
    per SM (all resident at once, so the memory system shares the bandwidth between them)."""

    tn: int = 64
    tk: int = 64
    td: int = 128
    num_warps: int = 4
    num_stages: int = 4
    programs_per_sm: int = 2

    def __str__(self):
        return f"tn{self.tn}tk{self.tk}td{self.td}w{self.num_warps}s{self.num_stages}p{self.programs_per_sm}"


def persistent_schedule(items: int, sms: int, programs_per_sm: int) -> tuple[int, int]:
    """(programs, items per program) for ``items`` equal work items on ``sms`` SMs.

    At most ``programs_per_sm * sms`` programs, all resident, each walking items
    ``p, p + P, ...``: the fewest items per program that fit, then the fewest programs
    for that count, so every program walks the same number of items (but for at most one).
    Programs progress at about the same rate when they share the memory bandwidth, so equal
    counts finish together instead of leaving a partial second wave to a few SMs."""
    per = gmm_plan.cdiv(items, max(1, programs_per_sm * sms))
    return gmm_plan.cdiv(items, per), per


def experts_by_id(x, weights, ids, w_gate, w_up, w_down, top_k: int):
    """The decode kernels' math in jnp (gathers the k experts' weights): y float32 [T, D].

    x [T, D]; weights float [T * k]; ids int32 [T * k] (outside [0, E): contributes 0).
    float32 accumulation, h rounded to x.dtype before the down projection (as every MoE
    path here does).
    """
    f32 = jnp.float32
    E = w_gate.shape[0]
    live = (ids >= 0) & (ids < E)
    weights, ids = jnp.where(live, weights, 0), jnp.where(live, ids, 0)
    xt = jnp.repeat(x, top_k, axis=0) if top_k > 1 else x                    # [N, D]
    g = jnp.einsum("nd,ndf->nf", xt, jnp.take(w_gate, ids, axis=0), preferred_element_type=f32)
    u = jnp.einsum("nd,ndf->nf", xt, jnp.take(w_up, ids, axis=0), preferred_element_type=f32)
    h = (gmm_plan.silu(g) * u).astype(x.dtype)
    o = jnp.einsum("nf,nfd->nd", h, jnp.take(w_down, ids, axis=0), preferred_element_type=f32)
    y = weights.astype(f32)[:, None] * o
    return y.reshape(x.shape[0], top_k, -1).sum(1)

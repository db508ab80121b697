"""Logical axis names -> mesh axes, and placing a model's state on a mesh.

Layers annotate parameters with logical names (see :mod:`sparse_jax.nn._common`);
``rules`` map each name to a mesh axis (or None: replicated). Names without a
rule, and rules naming an axis the mesh lacks, replicate, so one rule set serves
meshes of any shape (a 1-device mesh, ("data", "model"), ("data", "expert")...).
Meshes are expected to use ``AxisType.Auto`` axes (XLA propagates the shardings
of the activations); with explicit axes, contractions over sharded dims need
``out_sharding`` annotations the layers do not make.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("expert", "expert"),
    ("vocab", "model"),
)


def logical_to_mesh(spec: PartitionSpec, rules: Rules = DEFAULT_RULES, mesh_axes=None) -> PartitionSpec:
    """Map a PartitionSpec of logical names to mesh axes (``mesh_axes``: the axes that exist)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in spec:
        axis = table.get(name) if isinstance(name, str) else None
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        # An axis already used by an earlier dimension (or absent from the mesh) replicates.
        axes = tuple(a for a in axes if (mesh_axes is None or a in mesh_axes) and a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def partition_specs(tree, rules: Rules = DEFAULT_RULES, mesh: jax.sharding.Mesh | None = None):
    """Mesh PartitionSpecs for an nnx state (or module): the same tree with PartitionSpec leaves."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    axes = None if mesh is None else tuple(mesh.axis_names)
    logical = nnx.get_partition_spec(tree)
    return jax.tree.map(lambda s: logical_to_mesh(s, rules, axes), logical,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place ``model``'s state on ``mesh`` following ``rules`` (in place; returns the model)."""
    state = nnx.state(model)
    specs = partition_specs(state, rules, mesh)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    nnx.update(model, jax.device_put(state, shardings))
    return model

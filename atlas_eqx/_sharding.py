r"""Sharding models over a device mesh: data parallelism and head (tensor) parallelism.

A mesh has two named axes, `"data"` and `"heads"`, whose sizes multiply to the number of
devices (`make_mesh({"data": 4, "heads": 2})`, or the string `"data=4,heads=2"`).

- **Data parallelism.** A batch `(B, T)` is split over `"data"` (`batch_sharding`): each
  device row holds `B / data` sequences. Parameters are replicated over `"data"`; under `jit`
  the gradient is summed across the axis by XLA (GSPMD), so the sharded step computes the
  same function as the single-device one, up to the order of floating-point sums.
- **Head parallelism.** Every token mixer with heads (`MemoryLayer`: one memory per head;
  `AttentionLayer`) has its per-head parameters split over `"heads"`, so that each device
  holds whole heads: the rows of the q, k, v and output-gate projections (`(H * d_h,
  d_model)`, head-major), the columns of the output projection, the gates' rows, the stacked
  memories $W_0^{(h)}$ and feature-map coefficients, and the per-head norm scales. The memory
  scan runs per head (`vmap` over heads), so each device can scan only its own heads, and the
  layout asks for one all-reduce after the output projection (Megatron's row-parallel layer)
  plus the gradient reductions; which collectives run is XLA's partitioner's choice (GSPMD):
  for `atlas` on `data=4,heads=2` it also inserts all-to-alls and permutes around the
  q/k/v layout, while the stacked memories appear in the compiled program only at their
  per-device shape (`tests/test_sharding.py`). What has no head axis is replicated: the embedding,
  the SwiGLU MLPs, the norms, the short convolution's weights (its channels are q, k, v
  concatenated, not head-major) and MAG/MAL's own mixing weights.

`parameter_shardings(model, mesh)` declares these placements (a pytree of `NamedSharding`
matching `eqx.filter(model, eqx.is_array)`); `shard(tree, shardings)` places host or device
arrays accordingly; `optimizer_state_shardings` gives an optax state the shardings of the
parameters it mirrors (Adam's moments) and replicates the rest (step counts). The mesh uses
`AxisType.Auto`, so jitted code needs no mesh context (see the toolchain notes, section 2f).

**Multi-host.** On several hosts (a TPU pod slice, several GPU nodes), call
`jax.distributed.initialize()` (coordinator address, number of processes and process id come
from the cluster environment on TPU and SLURM, or pass them explicitly) in every process
before any other JAX call; `jax.devices()` then lists the devices of every host, and
`make_mesh` lays the mesh over all of them. `shard` builds each global array with
`jax.make_array_from_callback`, so every process passes the same global value (the training
loop's batches are a pure function of the step, and initialisation a pure function of the
seed) and transfers only the slices that its own devices hold. Keep `"heads"` within a host
(make it at most the number of local devices) so that the per-layer all-reduce stays on the
fast interconnect, and let `"data"` span hosts.
"""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from ._attention import AttentionLayer
from ._layer import MemoryLayer


MESH_AXES = ("data", "heads")

_HEAD_ROWS = ("q_proj", "k_proj", "v_proj", "gate_proj", "norm_scale")
_HEAD_STACKED = ("memory", "feature_map", "lr_gate", "decay_gate", "momentum_gate", "gamma_gate")


def parse_mesh(spec: str | Mapping[str, int], device_count: int | None = None) -> dict[str, int]:
    """The axis sizes `{"data": d, "heads": h}` of a mesh specification.

    `spec` is a string `"data=4,heads=2"` (either axis may be left out; it then has size 1)
    or a mapping. With `device_count` given, `d * h` must equal it. Raises `ValueError`
    naming the offending axis or value.
    """
    if isinstance(spec, str):
        sizes: dict[str, Any] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep:
                raise ValueError(
                    f"mesh {spec!r}: expected comma-separated AXIS=SIZE items such as "
                    f"'data=4,heads=2'; got {part!r}"
                )
            if name in sizes:
                raise ValueError(f"mesh {spec!r}: axis {name!r} is given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(
                    f"mesh {spec!r}: the size of axis {name!r} must be an integer; got {value!r}"
                ) from None
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh {spec!r}: unknown axis {unknown}; the axes are {MESH_AXES}")
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh {spec!r}: axis {name!r} must have size >= 1; got {size!r}")
    out = {name: int(sizes.get(name, 1)) for name in MESH_AXES}
    if device_count is not None and out["data"] * out["heads"] != device_count:
        raise ValueError(
            f"mesh {spec!r}: data={out['data']} x heads={out['heads']} = "
            f"{out['data'] * out['heads']} devices, but {device_count} are available "
            f"(jax.device_count()); the product of the axis sizes must equal it"
        )
    return out


def make_mesh(spec: str | Mapping[str, int], *, devices: Any = None) -> Mesh:
    """A `("data", "heads")` mesh over `devices` (default: all of `jax.devices()`, every host
    after `jax.distributed.initialize`), with `AxisType.Auto` axes (GSPMD)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh(spec, len(devices))
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh(
        (sizes["data"], sizes["heads"]), MESH_AXES, axis_types=(auto, auto), devices=devices
    )


def _leading(ndim: int, axis: str = "heads") -> PartitionSpec:
    return PartitionSpec(axis, *([None] * (ndim - 1)))


def _check_heads(name: str, n_heads: int, mesh: Mesh) -> None:
    size = mesh.shape["heads"]
    if n_heads % size:
        raise ValueError(
            f"mesh axis heads={size} does not divide the {n_heads} heads of a {name}; "
            f"choose a heads size that divides n_heads={n_heads}"
        )


def _memory_layer_specs(layer: MemoryLayer, mesh: Mesh) -> PyTree:
    _check_heads("MemoryLayer", layer.config.n_heads, mesh)

    def spec(path: tuple, leaf: Any) -> PartitionSpec | None:
        if not eqx.is_array(leaf):
            return None
        field = path[0].name
        if field in _HEAD_ROWS or field in _HEAD_STACKED:
            return _leading(leaf.ndim)
        if field == "out_proj":
            return PartitionSpec(None, "heads")
        return PartitionSpec()  # conv_weight: channels are [q; k; v], not head-major

    return jax.tree_util.tree_map_with_path(spec, layer)


def _attention_specs(layer: AttentionLayer, mesh: Mesh) -> PyTree:
    _check_heads("AttentionLayer", layer.n_heads, mesh)

    def spec(path: tuple, leaf: Any) -> PartitionSpec | None:
        if not eqx.is_array(leaf):
            return None
        field = path[0].name
        if field in ("wq", "wk", "wv"):  # eqx.nn.Linear weight (H * d_h, d_model)
            return _leading(leaf.ndim)
        if field == "wo":  # (d_model, H * d_h)
            return PartitionSpec(None, "heads")
        return PartitionSpec()  # persistent tokens; conv_weight (channels [q; k; v])

    return jax.tree_util.tree_map_with_path(spec, layer)


def _is_headed(node: Any) -> bool:
    return isinstance(node, MemoryLayer | AttentionLayer)


def parameter_specs(model: PyTree, mesh: Mesh) -> PyTree:
    """The `PartitionSpec` of every array leaf of `model` (`None` at non-array leaves): per-head
    leaves of `MemoryLayer`s and `AttentionLayer`s over `"heads"` (see the module docstring),
    everything else replicated. Raises `ValueError` if the `"heads"` axis does not divide a
    layer's number of heads."""

    def visit(node: Any) -> Any:
        if isinstance(node, MemoryLayer):
            return _memory_layer_specs(node, mesh)
        if isinstance(node, AttentionLayer):
            return _attention_specs(node, mesh)
        return PartitionSpec() if eqx.is_array(node) else None

    return jax.tree.map(visit, model, is_leaf=_is_headed)


def parameter_shardings(model: PyTree, mesh: Mesh) -> PyTree:
    """`NamedSharding(mesh, spec)` for every spec of `parameter_specs(model, mesh)`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), parameter_specs(model, mesh))


def optimizer_state_shardings(
    optimizer: optax.GradientTransformation, opt_state: PyTree, param_shardings: PyTree
) -> PyTree:
    """The shardings of `opt_state` (from `optimizer.init(params)`): every copy of the
    parameter tree inside it (Adam's moments, ...) gets `param_shardings`, every other leaf
    (step counts) is replicated on the same mesh."""
    leaves = [s for s in jax.tree.leaves(param_shardings) if isinstance(s, NamedSharding)]
    if not leaves:
        raise ValueError("optimizer_state_shardings: `param_shardings` holds no NamedSharding")
    replicated = NamedSharding(leaves[0].mesh, PartitionSpec())
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        opt_state,
        param_shardings,
        transform_non_params=lambda leaf: replicated if eqx.is_array(leaf) else None,
        is_leaf=lambda x: x is None,
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """A batch `(B, ...)` split over `"data"` on its first axis, replicated over `"heads"`."""
    return NamedSharding(mesh, _leading(ndim, "data"))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """Raise `ValueError` unless the `"data"` axis divides `batch_size`."""
    data = mesh.shape["data"]
    if batch_size % data:
        raise ValueError(
            f"mesh axis data={data} does not divide the batch size {batch_size}; choose a "
            f"batch size that is a multiple of {data}"
        )


def shard(tree: PyTree, shardings: PyTree) -> PyTree:
    """Place every array leaf of `tree` with the matching leaf of `shardings` (a tree of the
    same structure, `None` at non-array leaves, or one `NamedSharding` for every leaf).

    Each global array is built by `jax.make_array_from_callback` from the leaf's host value,
    so on several hosts every process passes the same values and transfers only its own
    devices' slices."""

    def place(leaf: Any, sharding: Any) -> Any:
        if not eqx.is_array(leaf) or sharding is None:
            return leaf
        if isinstance(leaf, jax.Array):
            if leaf.sharding == sharding:
                return leaf
            if not leaf.is_fully_addressable:  # already global: reshard on the devices
                return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda leaf: place(leaf, shardings), tree)
    arrays, static = eqx.partition(tree, eqx.is_array)
    placed = jax.tree.map(place, arrays, shardings, is_leaf=lambda x: x is None)
    return eqx.combine(placed, static)


def constrain(tree: PyTree, shardings: PyTree) -> PyTree:
    """`jax.lax.with_sharding_constraint` on every array leaf of `tree` (inside `jit`): pins
    outputs (updated parameters, optimizer state) to their declared shardings."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    pinned = jax.tree.map(
        lambda leaf, sharding: (
            leaf
            if leaf is None or sharding is None
            else jax.lax.with_sharding_constraint(leaf, sharding)
        ),
        arrays,
        shardings,
        is_leaf=lambda x: x is None,
    )
    return eqx.combine(pinned, static)

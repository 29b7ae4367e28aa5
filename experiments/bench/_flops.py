r"""FLOPs of a traced JAX function, counted on its jaxpr and split by the code that emitted them.

XLA's own count (`jax.jit(f).lower(*args).compile().cost_analysis()["flops"]`) counts the body
of a loop once, whatever its trip count: a `lax.scan` of 10 matmuls of 64 x 64 reports one
matmul's 524,288 FLOPs. Every memory layer runs its recurrence in scans (over chunks, and the
Newton-Schulz iteration inside them), so that count is wrong by a factor of the sequence
length. `count_flops` therefore walks the jaxpr, which holds every loop with its trip count,
and follows XLA's conventions per operation (`tests/test_bench_flops.py` checks it against
`cost_analysis` on loop-free programs and on fully unrolled scans):

- `dot_general`: $2\times$ (output size) $\times$ (contracted size); convolutions likewise;
  a triangular solve with an $m\times m$ matrix: $m$ per right-hand-side element;
- element-wise arithmetic, comparisons, selects and casts: 1 per output element;
- transcendental functions (exp, log, tanh, logistic, sqrt, rsqrt, erf, pow, ...): not FLOPs,
  counted apart as `transcendentals`;
- reductions: (input size - output size); cumulative sums: the input size;
- data movement (reshape, transpose, slice, pad, gather, broadcast, ...): 0;
- `scan`: its length times its body; `cond`: the costliest branch; calls, `jit`, `remat`,
  custom derivatives: their body once. A `while_loop` (unknown trip count) is an error.

Each operation is charged to one part, named by the first rule that matches the source
frames it was traced from (its own, else those of the loop or call it sits in):
`newton_schulz` (`optimizers/_newton_schulz.py`), `feature_map` (the `feature_maps`
package), `attention` (`causal_attention`: scores, softmax and the weighted sum), `memory`
(`MemoryLayer.run_memory` and the scans under it: `omega_scan`, the chunked and exact forms,
the kernel memory), else `rest` (projections, convolution, gates, norms, output gate and
projection, RoPE, the loss). The parts sum to the total by construction.
"""

import math
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
from jax.extend import core as jex_core


PARTS = ("memory", "feature_map", "newton_schulz", "attention", "rest")

_TRANSCENDENTAL = {
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "tanh",
    "logistic",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "atan2",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "sqrt",
    "rsqrt",
    "cbrt",
    "pow",
    "erf",
    "erfc",
    "erf_inv",
    "lgamma",
    "digamma",
}
_ELEMENTWISE = {
    "add",
    "add_any",
    "sub",
    "mul",
    "div",
    "rem",
    "neg",
    "abs",
    "sign",
    "max",
    "min",
    "integer_pow",
    "square",
    "select_n",
    "clamp",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and",
    "or",
    "not",
    "xor",
    "floor",
    "ceil",
    "round",
    "is_finite",
    "nextafter",
    "reciprocal",
    "convert_element_type",
}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_FREE = {
    "reshape",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "slice",
    "dynamic_slice",
    "dynamic_update_slice",
    "pad",
    "concatenate",
    "split",
    "gather",
    "iota",
    "bitcast_convert_type",
    "reduce_precision",
    "copy",
    "copy_p",
    "rev",
    "stop_gradient",
    "select_and_gather_add",
    "sharding_constraint",
    "mesh_cast",
    "device_put",
    "pvary",
    "random_bits",
    "random_seed",
    "random_wrap",
    "random_unwrap",
    "threefry2x32",
    "shift_left",
    "shift_right_logical",
    "shift_right_arithmetic",
    "population_count",
    "stack",
    "unstack",
    "optimization_barrier",
    "tile",
}
_SCATTER = {"scatter-add", "scatter_add", "scatter-mul", "scatter_mul", "scatter"}

_MEMORY_FILES = (
    "atlas_eqx/_scan.py",
    "atlas_eqx/_chunked.py",
    "atlas_eqx/_sequential.py",
    "atlas_eqx/_exact_chunked.py",
    "atlas_eqx/_kernel.py",
    "atlas_eqx/_pallas.py",
)


def _size(aval: Any) -> int:
    return math.prod(getattr(aval, "shape", ()))


def _part_of(source_info: Any) -> str | None:
    """The part named by the source frames of one operation, or None when they name none."""
    traceback = source_info.traceback
    if traceback is None:
        return None
    files = [
        (frame.file_name.replace("\\", "/"), frame.function_name) for frame in traceback.frames
    ]
    if any(name.endswith("optimizers/_newton_schulz.py") for name, _ in files):
        return "newton_schulz"
    if any("/feature_maps/" in name for name, _ in files):
        return "feature_map"
    if any(function == "causal_attention" for _, function in files):
        return "attention"
    if any(function.endswith("run_memory") for _, function in files) or any(
        name.endswith(_MEMORY_FILES) for name, _ in files
    ):
        return "memory"
    return None


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jex_core.Jaxpr):
                found.append(item)
    return found


def _conv_flops(eqn: Any) -> int:
    rhs = eqn.invars[1].aval
    numbers = eqn.params["dimension_numbers"]
    out_features = rhs.shape[numbers.rhs_spec[0]]
    return 2 * _size(eqn.outvars[0].aval) * (_size(rhs) // out_features)


class MatrixProduct(NamedTuple):
    """One `dot_general` as traced: its operands' shapes and dtype, and its dimension numbers
    (`((lhs contracting, rhs contracting), (lhs batch, rhs batch))`)."""

    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    dtype: str
    dimension_numbers: tuple

    @property
    def flops(self) -> int:
        """2 x (output size) x (contracted size), as `count_flops` charges it."""
        (lhs_contracting, rhs_contracting), (_, rhs_batch) = self.dimension_numbers
        lhs_kept = [n for d, n in enumerate(self.lhs_shape) if d not in lhs_contracting]
        rhs_free = [
            n for d, n in enumerate(self.rhs_shape) if d not in (*rhs_contracting, *rhs_batch)
        ]
        contracted = [self.lhs_shape[d] for d in lhs_contracting]
        return 2 * math.prod(lhs_kept + rhs_free + contracted)


class FlopCount:
    """FLOPs and transcendentals per part (`PARTS`), and the primitives no rule knew.

    `matrix_flops` is the share of `total` in matrix products (dot_general, convolutions,
    triangular solves): what `torch.utils.flop_counter` counts, for a like-for-like comparison
    with a torch implementation. `products` counts how many times each distinct `dot_general`
    runs (`atlas-eqx bench matmul-bound` times each one on its own)."""

    def __init__(self) -> None:
        self.flops: Counter[str] = Counter({part: 0 for part in PARTS})
        self.matrix_flops = 0
        self.products: Counter[MatrixProduct] = Counter()  # dot_general -> times it runs
        self.transcendentals = 0
        self.unknown: set[str] = set()

    @property
    def total(self) -> int:
        return sum(self.flops.values())

    def _walk(self, jaxpr: Any, multiplier: int, inherited: str) -> None:
        for eqn in jaxpr.eqns:
            part = _part_of(eqn.source_info) or inherited
            name = eqn.primitive.name
            subs = _sub_jaxprs(eqn.params)
            if name == "while":
                raise ValueError(
                    "count_flops: a while_loop has no static trip count; its FLOPs are unknown"
                )
            if name == "scan":
                self._walk(subs[0], multiplier * eqn.params["length"], part)
            elif name == "cond":
                costs = []
                for branch in subs:
                    count = FlopCount()
                    count._walk(branch, multiplier, part)
                    costs.append(count)
                costliest = max(costs, key=lambda c: c.total)
                self.flops.update(costliest.flops)
                self.matrix_flops += costliest.matrix_flops
                self.products.update(costliest.products)
                self.transcendentals += costliest.transcendentals
                self.unknown |= costliest.unknown
            elif subs:
                for sub in subs:
                    self._walk(sub, multiplier, part)
            else:
                self._charge(eqn, name, multiplier, part)

    def _charge(self, eqn: Any, name: str, multiplier: int, part: str) -> None:
        out = sum(_size(v.aval) for v in eqn.outvars)
        if name in ("dot_general", "conv_general_dilated", "triangular_solve"):
            if name == "dot_general":
                lhs, rhs = (v.aval for v in eqn.invars)
                product = MatrixProduct(
                    lhs.shape, rhs.shape, str(lhs.dtype), eqn.params["dimension_numbers"]
                )
                flops = product.flops
                self.products[product] += multiplier
            elif name == "conv_general_dilated":
                flops = _conv_flops(eqn)
            else:
                flops = eqn.invars[0].aval.shape[-1] * _size(eqn.invars[1].aval)
            self.matrix_flops += multiplier * flops
        elif name in _ELEMENTWISE:
            flops = out
        elif name in _TRANSCENDENTAL:
            self.transcendentals += multiplier * out
            return
        elif name in _REDUCTIONS:
            flops = _size(eqn.invars[0].aval) - out
        elif name in _CUMULATIVE:
            flops = _size(eqn.invars[0].aval)
        elif name in _SCATTER:
            flops = _size(eqn.invars[-1].aval)
        elif name in _FREE:
            return
        else:
            self.unknown.add(name)
            flops = out
        self.flops[part] += multiplier * flops


def _without_dead_code(jaxpr: Any) -> Any:
    try:  # jax's own dead-code elimination (not public API): XLA drops that work too
        from jax._src.interpreters import partial_eval as pe

        return pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0]
    except Exception:
        return jaxpr


def count_flops(function: Callable, *args: Any) -> FlopCount:
    """The FLOPs of `function(*args)` (traced, never run), per part; see the module docstring.
    Operations whose results nothing uses are dropped first (as XLA drops them)."""
    closed, _, _ = eqx.filter_make_jaxpr(function)(*args)
    count = FlopCount()
    count._walk(_without_dead_code(closed.jaxpr), 1, "rest")
    return count

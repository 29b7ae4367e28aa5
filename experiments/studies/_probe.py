"""Write-strength probe (issue 18): how hard does a layer write its memory at initialisation?

Every number is measured on the memory alone (`MemoryLayer.memory_inputs` / `run_memory`,
before the output norm, gate and projection), per head, with the layer's initial weights:

- **write gain**: $n$ random unit-norm keys $k_i$ with values $v_i$ (random, unit RMS per
  head vector, times `value_scale`) are written by tokens $1..n$ with the layer's own gates
  ($\\eta, \\alpha, \\theta, \\gamma$ from `memory_inputs` of $x \\sim \\mathcal N(0, 1)$); tokens
  $n+1..2n$ are read-only queries $q_{n+i} = k_i$ ($\\eta = 0$, $\\alpha = 1$, $\\gamma = 0$).
  The baseline $y_0$ is the same run with $\\eta = 0$ at every token (nothing written).
  `write_gain` $= \\mathrm{mean}_{h,i}\\,\\|y(k_i) - y_0(k_i)\\| / \\|v_i - y_0(k_i)\\|$: the
  fraction of the needed correction the writes achieved (1: written exactly).
- **growth**: 10k unit-norm random keys, queries and values per head at the gates' extremes
  (step gate at its supremum 1, i.e. $\\eta$ = `MemoryLayer.inner_step_size` of a gate of 1,
  $\\alpha = 1$, $\\theta = 0.99$, $\\gamma = 1$), streamed through
  `run_memory` in chunk-aligned pieces of ~1000 tokens with the carried state.
"""

import dataclasses
import math
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

import atlas_eqx as ae

from ..training._recall import layout_options


ALL_PRESETS = tuple(ae.presets.__all__)
PIECE_TOKENS = 1000
EXTREME_MOMENTUM = 0.99


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """The probe of one layer; `nan` where a number does not apply (see `note`).

    - `write_gain`: mean over heads and pairs of $\\|y(k_i) - y_0(k_i)\\| / \\|v_i -
      y_0(k_i)\\|$ after `n_writes` writes at `value_scales[0]` (1; module docstring).
    - `gain_vs_read`: $\\mathrm{mean}\\|y - y_0\\| / \\mathrm{mean}\\|y_0\\|$ over the same reads
      (issue 18's $\\|\\Delta y\\|/\\|y_0\\|$); `nan` when $y_0 = 0$ ($W_0 = 0$, kernel memories).
    - `gains_by_scale`: `write_gain` at each of `value_scales` (same keys, same value
      directions). Linear GD memories with $W_0 = 0$ are exactly flat; Muon's orthogonalised
      step has a fixed size, so its gain falls like 1/scale.
    - `recall`: fraction of pairs $i$ (over heads) whose read $y(k_i)$ has its largest cosine
      with $v_i$ among the written $v_j$, at `value_scales[0]`.
    - `norm_start`, `norm_max`: Frobenius norm of all fast-weight leaves of the state (all
      heads) at the start and the largest after any piece of the 10k-token run.
    - `growth`: `norm_max / norm_start` (`nan` if $W_0 = 0$: read `norm_max`; `inf` if the
      weights went non-finite).
    - `finite`: the outputs (and fast weights) of the long run stayed finite; `None`: not run.
    - `diverged_at`: tokens streamed when the first non-finite piece ended (the run stops
      there; `norm_max` is over the finite pieces before it), or `None`.
    - `long_tokens`: tokens of the long run (kernel memories: one head; `note` says so).
    """

    name: str
    kind: str
    write_gain: float = math.nan
    gain_vs_read: float = math.nan
    value_scales: tuple[float, ...] = ()
    gains_by_scale: tuple[float, ...] = ()
    recall: float = math.nan
    norm_start: float = math.nan
    norm_max: float = math.nan
    growth: float = math.nan
    finite: bool | None = None
    diverged_at: int | None = None
    long_tokens: int = 0
    seconds: float = 0.0
    note: str = ""


def _unit(x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _fast_weight_norm(state: Any) -> Array:
    leaves = jax.tree.leaves(eqx.filter(state.memory, eqx.is_inexact_array))
    return jnp.sqrt(sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in leaves))


@eqx.filter_jit
def _run(layer: ae.MemoryLayer, inputs: ae.MemoryInputs, state: Any = None):
    return layer.run_memory(inputs, state)


@eqx.filter_jit
def _run_piece(layer: ae.MemoryLayer, inputs: ae.MemoryInputs, state: Any):
    y, state = layer.run_memory(inputs, state)
    finite = jnp.all(jnp.isfinite(y))
    if layer.config.memory == "kernel":
        return state, finite, jnp.float32(jnp.nan)
    return state, finite, _fast_weight_norm(state)


def write_probe(
    layer: ae.MemoryLayer, *, n_writes: int, value_scales: Sequence[float], key: PRNGKeyArray
) -> tuple[list[float], float, float]:
    """`(gains by value scale, gain_vs_read at the first scale, recall at the first scale)`
    of `n_writes` writes; see `ProbeResult` for each number."""
    c, n = layer.config, n_writes
    kx, kk, kv = jax.random.split(key, 3)
    x = jax.random.normal(kx, (2 * n, layer.d_model))
    base = layer.memory_inputs(x)
    H = base.k.shape[0]
    keys = _unit(jax.random.normal(kk, (H, n, base.k.shape[2])))
    v_dir = jax.random.normal(kv, (H, n, base.v.shape[2]))
    v_dir = v_dir / jnp.sqrt(jnp.mean(v_dir**2, axis=-1, keepdims=True))
    reading = jnp.arange(2 * n) >= n
    gamma = base.gamma
    if gamma is not None:
        mask = reading[None, :, None] if gamma.ndim == 3 else reading[None, :]
        gamma = jnp.where(mask, 0.0, gamma)
    inputs = eqx.tree_at(
        lambda i: (i.q, i.k, i.lr, i.decay),
        base,
        (
            base.q.at[:, n:].set(keys),
            base.k.at[:, :n].set(keys),
            jnp.where(reading[None], 0.0, base.lr),
            jnp.where(reading[None], 1.0, base.decay),
        ),
    )
    if gamma is not None:
        inputs = eqx.tree_at(lambda i: i.gamma, inputs, gamma)
    gains: list[float] = []
    shift_mean = read_mean = recall = math.nan
    for s, scale in enumerate(value_scales):
        v = scale * v_dir
        run_inputs = eqx.tree_at(lambda i: i.v, inputs, inputs.v.at[:, :n].set(v))
        y = _run(layer, run_inputs)[0][:, n:]
        if c.memory == "kernel":
            y0 = jnp.zeros_like(y)  # W_0 = 0; the normalised form reads 0/0 from no tokens
        else:
            baseline = eqx.tree_at(lambda i: i.lr, run_inputs, jnp.zeros_like(base.lr))
            y0 = _run(layer, baseline)[0][:, n:]
        shift = jnp.linalg.norm(y - y0, axis=-1)
        gains.append(float(jnp.mean(shift / jnp.linalg.norm(v - y0, axis=-1))))
        if s == 0:
            shift_mean = float(jnp.mean(shift))
            read_mean = float(jnp.mean(jnp.linalg.norm(y0, axis=-1)))
            cosine = jnp.einsum("hid,hjd->hij", _unit(y), _unit(v))
            recall = float(jnp.mean(jnp.argmax(cosine, axis=-1) == jnp.arange(n)))
    gain_vs_read = shift_mean / read_mean if read_mean > 0 else math.nan
    return gains, gain_vs_read, recall


def growth_probe(
    layer: ae.MemoryLayer, *, tokens: int, key: PRNGKeyArray
) -> tuple[float, float, int | None, int]:
    """`(norm_start, norm_max, diverged_at, tokens run)` of the gates-at-extremes stream (module
    docstring): `norm_max` over the pieces that stayed finite; `diverged_at` is the token count
    at the end of the first piece with a non-finite output or weight (the run stops there), or
    `None`. Kernel memories (state = tokens) run one head and have no norms (`nan`)."""
    c = layer.config
    kernel = c.memory == "kernel"
    H = 1 if kernel else c.n_heads
    piece = PIECE_TOKENS if kernel else max(1, PIECE_TOKENS // c.chunk_size) * c.chunk_size
    if kernel:
        state = jax.tree.map(lambda a: a[:1], layer.initial_memory_state(tokens))
        norm_start = math.nan
    else:
        state = layer.initial_memory_state()
        norm_start = float(_fast_weight_norm(state))
    norms, diverged_at, done = [], None, 0
    while done < tokens:
        size = min(piece, tokens - done)
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, done), 3)
        shape = (H, size, c.d_head)
        ones = jnp.ones((H, size))
        gamma = None
        if c.gamma_mode != "none":
            gamma = ones if c.gamma_mode == "token" else jnp.ones((H, size, c.window))
        momentum = EXTREME_MOMENTUM * ones if c.uses_momentum else None
        inputs = ae.MemoryInputs(
            q=_unit(jax.random.normal(kq, shape)),
            k=_unit(jax.random.normal(kk, shape)),
            v=_unit(jax.random.normal(kv, shape)),
            lr=c.lr_max * ones if kernel else layer.inner_step_size(ones, momentum),
            decay=ones,
            momentum=momentum,
            gamma=gamma,
        )
        state, piece_finite, norm = _run_piece(layer, inputs, state)
        done += size
        if not (bool(piece_finite) and (kernel or math.isfinite(norm))):
            diverged_at = done
            break
        norms.append(float(norm))
    return norm_start, max(norms, default=math.nan), diverged_at, done


def probe_layer(
    layer: Any,
    *,
    n_writes: int = 8,
    value_scales: Sequence[float] = (1.0, 3.0, 10.0),
    long_tokens: int = 10_000,
    key: PRNGKeyArray,
    name: str = "",
) -> ProbeResult:
    """Probe a `MemoryLayer`, the memory of a `MAGLayer` / `MALLayer`, or report an
    `AttentionLayer` (no fast weights) as n/a. `long_tokens=0` skips the growth run."""
    start = time.perf_counter()
    name = name or type(layer).__name__
    if isinstance(layer, ae.AttentionLayer):
        return ProbeResult(name, "attention", note="attention: no fast weights")
    note = ""
    if isinstance(layer, (ae.MAGLayer, ae.MALLayer)):
        layer = layer.memory
        note = f"hybrid: its memory layer probed ({layer.config.memory}, {layer.config.optimizer})"
    if not isinstance(layer, ae.MemoryLayer):
        raise ValueError(f"probe_layer: cannot probe a {type(layer).__name__}")
    kernel = layer.config.memory == "kernel"
    k_write, k_long = jax.random.split(key)
    gains, gain_vs_read, recall = write_probe(
        layer, n_writes=n_writes, value_scales=value_scales, key=k_write
    )
    norm_start = norm_max = math.nan
    diverged_at, finite, tokens = None, None, 0
    if long_tokens > 0:
        norm_start, norm_max, diverged_at, tokens = growth_probe(
            layer, tokens=long_tokens, key=k_long
        )
        finite = diverged_at is None
    if kernel:
        growth = math.nan
        note = "kernel memory: state holds tokens, growth n/a; long run: head 0's outputs"
    elif finite is False:
        growth = math.inf
    else:
        growth = norm_max / norm_start if norm_start > 0 else math.nan
    return ProbeResult(
        name=name,
        kind="kernel" if kernel else "memory",
        write_gain=gains[0],
        gain_vs_read=gain_vs_read,
        value_scales=tuple(float(s) for s in value_scales),
        gains_by_scale=tuple(gains),
        recall=recall,
        norm_start=norm_start,
        norm_max=norm_max,
        growth=growth,
        finite=finite,
        diverged_at=diverged_at,
        long_tokens=tokens,
        seconds=time.perf_counter() - start,
        note=note,
    )


def probe_presets(
    names: Sequence[str] = ALL_PRESETS,
    d_model: int = 64,
    n_heads: int = 4,
    chunk_size: int | None = None,
    window: int | None = None,
    *,
    n_writes: int = 8,
    value_scales: Sequence[float] = (1.0, 3.0, 10.0),
    long_tokens: int = 10_000,
    seed: int = 0,
    preset_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> list[ProbeResult]:
    """`probe_layer` of `atlas_eqx.presets.NAME(d_model, n_heads, key=PRNGKey(seed),
    **layout_options(NAME, chunk_size, window), **preset_options[NAME])` for each name (the
    main job's layout: `experiments/training/_recall.py::layout_options`)."""
    results = []
    for name in names:
        options = {
            **layout_options(name, chunk_size, window),
            **(preset_options or {}).get(name, {}),
        }
        layer = getattr(ae.presets, name)(d_model, n_heads, key=jax.random.key(seed), **options)
        result = probe_layer(
            layer,
            n_writes=n_writes,
            value_scales=value_scales,
            long_tokens=long_tokens,
            key=jax.random.key(seed + 1),
            name=name,
        )
        results.append(result)
        if progress:
            print(f"probe {name}: {result.seconds:.1f} s", flush=True)
    return results


def _num(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:.{digits}g}"


def format_table(results: Sequence[ProbeResult], *, command: str = "") -> str:
    """A markdown page: the command, what each column is, one row per result."""
    scales = results[0].value_scales if results else ()
    scale_head = " / ".join(f"{s:g}" for s in scales)
    lines = [
        "# Write-strength probe at initialisation (issue 18)",
        "",
        f"Command: `{command}`" if command else "",
        "",
        "- **write gain**: mean over heads and pairs of ||y(k_i) - y0(k_i)|| / ||v_i - y0(k_i)||"
        " after n random unit-key writes with the layer's own initial gates, read back by"
        " read-only queries q = k_i; y0: same run with lr = 0 everywhere (1 = written exactly).",
        "- **dy/y0**: mean ||y - y0|| / mean ||y0|| (n/a when y0 = 0: W_0 = 0 or kernel memory).",
        f"- **gain at v scale {scale_head}**: write gain with the values times each scale.",
        "- **recall**: fraction of pairs whose read has its largest cosine with its own value.",
        "- **‖W‖ start / max, growth**: Frobenius norm of all fast weights (all heads) at the"
        " start and the largest after any ~1000-token piece of a long stream of unit keys,"
        " queries and values at the largest step the layer can take (step gate 1), decay = 1, momentum = 0.99, gamma = 1;"
        " growth = max / start (n/a for W_0 = 0). **finite**: outputs and weights stayed finite"
        " (the run stops at the first non-finite piece). Kernel memories (state = tokens): no"
        " ‖W‖, only the finiteness of head 0's outputs. **tokens**: tokens of the long run.",
        "",
        f"| layer | write gain | dy/y0 | gain at v scale {scale_head} | recall | ‖W‖ start "
        "| ‖W‖ max | growth | finite | tokens | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        by_scale = " / ".join(_num(g) for g in r.gains_by_scale) or "n/a"
        finite = "n/a" if r.finite is None else "yes"
        if r.diverged_at is not None:
            finite = f"**no** (by token {r.diverged_at})"
        lines.append(
            f"| {r.name} | {_num(r.write_gain)} | {_num(r.gain_vs_read)} | {by_scale} | "
            f"{_num(r.recall, 2)} | {_num(r.norm_start)} | {_num(r.norm_max)} | "
            f"{_num(r.growth)} | {finite} | {r.long_tokens or 'n/a'} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def write_table(text: str, path: str | pathlib.Path) -> None:
    """Write `text` to `path`, creating its folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)

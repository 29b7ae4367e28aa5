"""Inside one subprocess of the `stream` part of `bench peers`: one head of a preset's memory,
streamed through `omega_scan` in fixed-size calls with the carried state, timed and its
resident memory traced (what streams and how it is measured: `_stream.py`).

jax is imported inside the functions: the parent process of `bench peers` never needs it.
"""

import math
import time
from collections.abc import Callable
from typing import Any

from ._subprocess import _rss_mib as resident_mb  # VmRSS, as `training._stream.resident_mb`


# name -> the preset whose memory configuration streams, and its overrides.
STREAM_MEMORIES: dict[str, dict[str, Any]] = {
    "atlas (exact Muon)": dict(preset="atlas", options={"muon_per_chunk": False}),
    "atlas muon_per_chunk": dict(preset="atlas", options={"muon_per_chunk": True}),
    "titans": dict(preset="titans", options={}),
}
EXACT = "atlas (exact Muon)"


def stream_setup(name: str, head_dim: int, chunk: int, dtype: Any = None) -> dict[str, Any]:
    """The preset's memory configuration for one head of dimension `head_dim`: `config` (its
    `MemoryLayerConfig`), `memory` ($\\mathcal M_0$ in `dtype`, default float32),
    `feature_map`, `optimizer`, and `lr`: the step the layer takes with its gates at their
    initial values (`MemoryLayer.inner_step_size` of the gate `lr_init / lr_max`)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import atlas_eqx as ae

    if name not in STREAM_MEMORIES:
        raise ValueError(
            f"stream_setup: unknown memory {name!r}; choose from {list(STREAM_MEMORIES)}"
        )
    entry = STREAM_MEMORIES[name]
    factory = getattr(ae.presets, entry["preset"])
    layer = factory(head_dim, 1, key=jax.random.key(0), chunk_size=chunk, **entry["options"])
    config = layer.config
    memory = config.make_memory(key=jax.random.key(1))
    dtype = jnp.float32 if dtype is None else dtype
    memory = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, memory)
    momentum = jnp.full((1, 1), config.momentum_init) if config.uses_momentum else None
    lr = layer.inner_step_size(jnp.full((1, 1), config.lr_init / config.lr_max), momentum)
    return dict(
        config=config,
        memory=memory,
        feature_map=config.make_feature_map(),
        optimizer=config.inner_optimizer(),
        lr=float(lr[0, 0]),
    )


def stream_inputs(key: Any, index: Any, tokens: int, dim: int, dtype: Any) -> tuple[Any, Any, Any]:
    """Call `index`'s queries and keys (random unit vectors) and values (normal, norm ~1)."""
    import jax
    import jax.numpy as jnp

    kq, kk, kv = jax.random.split(jax.random.fold_in(key, index), 3)
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    q = unit(jax.random.normal(kq, (tokens, dim), dtype))
    k = unit(jax.random.normal(kk, (tokens, dim), dtype))
    v = jax.random.normal(kv, (tokens, dim), dtype) / math.sqrt(dim)
    return q, k, v


def stream_scan(setup: dict[str, Any], state: Any, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    """One call: `omega_scan(method="chunked", state=state)` with the preset's memory options
    and its initial gates held fixed. Returns `(y, state)`."""
    import jax.numpy as jnp

    import atlas_eqx as ae

    c = setup["config"]
    n, dtype = q.shape[0], q.dtype
    full = lambda value: jnp.full((n,), value, dtype)
    return ae.omega_scan(
        state.memory,
        q,
        k,
        v,
        full(setup["lr"]),
        full(c.decay_inits()[0]),
        full(c.momentum_init) if c.uses_momentum else None,
        full(c.gamma_init) if c.gamma_mode == "token" else None,
        feature_map=setup["feature_map"],
        objective=ae.l2,
        optimizer=setup["optimizer"],
        window=c.window,
        chunk_size=c.chunk_size,
        method="chunked",
        state=state,
        decay_first=c.decay_first,
        muon_per_chunk=c.muon_per_chunk,
        check_values=False,
    )


def initial_stream_state(setup: dict[str, Any]) -> Any:
    import atlas_eqx as ae

    return ae.init_omega_state(setup["memory"], setup["optimizer"], setup["config"].window)


def make_stream_call(setup: dict[str, Any], call_tokens: int, seed: int) -> Callable:
    """The compiled call `(state, index) -> (state, sum of y)`: draws call `index`'s inputs and
    scans them (the sum keeps the reads from being optimised away and checks finiteness)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    dim = setup["config"].d_head
    key = jax.random.key(seed)
    traces = [0]

    @eqx.filter_jit
    def compiled(state, index):
        traces[0] += 1  # runs only when jax traces (compiles) a new program
        q, k, v = stream_inputs(key, index, call_tokens, dim, jnp.float32)
        y, state = stream_scan(setup, state, q, k, v)
        return state, jnp.sum(y)

    def call(state, index):
        # The index as an array: a Python int would be static and compile every call.
        return compiled(state, jnp.asarray(index, jnp.uint32))

    call.traces = traces  # pyright: ignore[reportFunctionMemberAccess]
    return call


def describe_setup(setup: dict[str, Any]) -> str:
    """The memory configuration in words, from the preset's `MemoryLayerConfig`."""
    c = setup["config"]
    memory = setup["memory"]
    parts = [
        f"{c.memory} memory (depth {c.memory_depth}, hidden {c.memory_expansion * c.d_head}, "
        f"{c.memory_activation}, residual {'on' if getattr(memory, 'residual', False) else 'off'})",
        f"phi {c.feature_map} degree {c.feature_degree}"
        f"{' with constant' if c.feature_include_constant else ''} "
        f"({memory.d_in} features of d_k {c.d_head})"
        if c.feature_map != "identity"
        else "phi identity",
        f"window c = {c.window}" + (f", gamma = {c.gamma_init}" if c.gamma_mode == "token" else ""),
        f"{c.objective} objective",
        f"{c.optimizer}" + (f" ({c.ns_steps} NS steps)" if c.optimizer == "muon" else ""),
        f"eta = {setup['lr']:.4g}, alpha = {c.decay_inits()[0]:.4g} (head 0)"
        + (f", theta = {c.momentum_init}" if c.uses_momentum else ""),
        f"chunk {c.chunk_size}",
    ]
    if c.muon_per_chunk:
        parts.append("muon_per_chunk (NS once per chunk)")
    return "; ".join(parts)


def _thin(trace: list[tuple[int, float]], points: int) -> list[tuple[int, float]]:
    """About `points` samples of `trace`, log-spaced in the call index, first and last kept."""
    if len(trace) <= points:
        return trace
    keep = {0, len(trace) - 1}
    keep |= {
        min(len(trace) - 1, round(math.exp(i * math.log(len(trace)) / points)) - 1)
        for i in range(points + 1)
    }
    return [trace[i] for i in sorted(keep)]


def measure_stream(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside one measurement subprocess: stream `spec["T"]` tokens and report the numbers."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rss_imports = resident_mb()
    setup = stream_setup(spec["memory"], spec["head_dim"], spec["chunk"])
    state = initial_stream_state(setup)
    state_bytes = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(state))
    call = make_stream_call(setup, spec["call_tokens"], spec["seed"])
    calls = spec["T"] // spec["call_tokens"]
    start = time.perf_counter()
    description = describe_setup(setup)
    state, total = call(state, 0)
    checksum = float(jax.block_until_ready(total))
    first_s = time.perf_counter() - start
    rss_first = resident_mb()
    trace = [(spec["call_tokens"], rss_first)]
    finite = math.isfinite(checksum)
    start = time.perf_counter()
    for index in range(1, calls):
        state, total = call(state, index)
        value = float(jax.block_until_ready(total))
        finite = finite and math.isfinite(value)
        trace.append(((index + 1) * spec["call_tokens"], resident_mb()))
    stream_s = time.perf_counter() - start
    finite = finite and bool(
        all(
            bool(jnp.all(jnp.isfinite(x)))
            for x in jax.tree.leaves(state)
            if jnp.issubdtype(x.dtype, jnp.floating)
        )
    )
    rss = [r for _, r in trace]
    return dict(
        rss_imports_mib=rss_imports,
        calls=calls,
        call_tokens=spec["call_tokens"],
        first_call_s=first_s,
        stream_s=stream_s,
        timed_tokens=(calls - 1) * spec["call_tokens"],
        rss_first_mib=rss_first,
        rss_max_mib=max(rss[1:]) if len(rss) > 1 else rss_first,
        rss_end_mib=rss[-1],
        rss_trace=_thin(trace, spec["trace_points"]),
        state_kib=state_bytes / 1024,
        compilations=call.traces[0],  # pyright: ignore[reportFunctionMemberAccess]
        setup=description,
        finite=finite,
    )

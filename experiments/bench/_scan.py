"""`atlas-eqx bench scan`: sequential versus chunked `omega_scan`, side by side in one run."""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import atlas_eqx as ae
import optimizers as iopt
from atlas_eqx import _chunked
from atlas_eqx._scan_inputs import ScanInputs


@dataclass(frozen=True)
class ScanBenchConfig:
    lengths: tuple[int, ...] = (512, 2048, 8192)
    chunk_sizes: tuple[int, ...] = (16, 64)
    d_k: int = 64
    d_v: int = 64
    hidden: int = 128
    window: int = 4
    repeats: int = 5
    min_repeats: int = 3
    round_budget_s: float = 60.0
    methods: tuple[str, ...] = ("sequential", "chunked")
    setups: tuple[str, ...] = ("linear+gd", "mlp+momentum", "mlp+muon")
    max_sequential_length: int = 8192
    floor: bool = True  # add the `floor` row to linear+gd (see `_floor_forward`)
    reference: bool = True  # add the `reference` row to linear+gd (`reference_chunked_forward`)
    gemm_size: int = 1024  # linear+gd: a float32 matmul of this size timed in the same rounds


def _setup(name: str, d_k: int, d_v: int, hidden: int, key):
    if name == "linear+gd":
        return ae.LinearMemory(d_k, d_v, key=key), iopt.gd()
    if name == "mlp+momentum":
        return ae.MLPMemory(d_k, d_v, key=key, hidden=hidden), iopt.momentum()
    if name == "mlp+muon":
        return ae.MLPMemory(d_k, d_v, key=key, hidden=hidden), iopt.muon()
    raise ValueError(f"unknown benchmark setup {name!r}")


def _inputs(T: int, d_k: int, d_v: int, key):
    kq, kk, kv, kg = jax.random.split(key, 4)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(kq, (T, d_k)))
    k = unit(jax.random.normal(kk, (T, d_k)))
    v = jax.random.normal(kv, (T, d_v))
    gates = jax.nn.sigmoid(jax.random.normal(kg, (4, T)))
    return q, k, v, 0.1 * gates[0], 0.9 + 0.1 * gates[1], gates[2], gates[3]


def _functions(memory, optimizer, window: int, chunk_size: int, method: str):
    muon_per_chunk = method == "chunked-nsc"
    method = "chunked" if muon_per_chunk else method

    def forward(memory, q, k, v, lr, decay, momentum, gamma):
        y, _ = ae.omega_scan(
            memory,
            q,
            k,
            v,
            lr,
            decay,
            momentum if optimizer.uses_momentum else None,
            gamma,
            optimizer=optimizer,
            window=window,
            chunk_size=chunk_size,
            method=method,  # pyright: ignore[reportArgumentType]
            muon_per_chunk=muon_per_chunk,
        )
        return y

    def loss(memory, q, k, v, lr, decay, momentum, gamma):
        return jnp.mean(forward(memory, q, k, v, lr, decay, momentum, gamma) ** 2)

    return eqx.filter_jit(forward), eqx.filter_jit(eqx.filter_grad(loss))


class _FloorInputs(eqx.Module):
    """Everything of the linear GD dual form that does not depend on the anchor, per chunk."""

    features_e: jax.Array  # (n_chunks, n_e, d_in): Phi_E
    values_e: jax.Array  # (n_chunks, n_e, d_out): V_E
    features_q: jax.Array  # (n_chunks, b, d_in): Q
    read_gram: jax.Array  # (n_chunks, b, n_e): C * (Q Phi_E^T)
    decays: jax.Array  # (n_chunks, b): A
    end_coefficients: jax.Array  # (n_chunks, n_e): the last row of C
    T: int = eqx.field(static=True)


def _floor_inputs(memory, window: int, chunk_size: int, q, k, v, lr, decay, momentum, gamma):
    del momentum  # gd
    state = ae.init_omega_state(memory, iopt.gd(), window)
    inputs = ScanInputs(q, k, v, lr, decay, jnp.zeros_like(lr), gamma)
    chunks, _ = _chunked.make_chunks(state, inputs, window=window, chunk_size=chunk_size)
    coefficients = _chunked._coefficients(chunks, uses_momentum=False).chunk_major()
    gram = jnp.einsum("nbi,nei->nbe", chunks.features_q, chunks.features_e)
    return _FloorInputs(
        features_e=chunks.features_e,
        values_e=chunks.values_e,
        features_q=chunks.features_q,
        read_gram=coefficients.C * gram,
        decays=coefficients.A,
        end_coefficients=coefficients.C[:, -1],
        T=v.shape[0],
    )


def _floor_forward(W: jax.Array, inputs: _FloorInputs) -> jax.Array:
    r"""The chunk loop of the linear GD dual form (`_chunked._linear_dual_scan`, l2 objective)
    with its anchor-independent work given: per chunk only the four matmuls that need the anchor,

    $$R = \Phi_EW_s^\top - V_E,\quad Y = A\odot(QW_s^\top) - (C\odot Q\Phi_E^\top)R,\quad
    W_{s+b} = A_bW_s - (C_b\odot R)^\top\Phi_E,$$

    under `jax.checkpoint` as in the library. It computes the same values as `omega_scan`
    (tested); the benchmark times it without `_floor_inputs`, so its speed is what the chunked
    path would reach on this machine if everything around its chunk loop were free.
    """

    def body(W, chunk):
        Phi, V, Q, K, A, c_end = chunk
        residual = Phi @ W.T - V
        y = A[:, None] * (Q @ W.T) - K @ residual
        return A[-1] * W - (c_end[:, None] * residual).T @ Phi, y

    per_chunk = (
        inputs.features_e,
        inputs.values_e,
        inputs.features_q,
        inputs.read_gram,
        inputs.decays,
        inputs.end_coefficients,
    )
    _, y = jax.lax.scan(jax.checkpoint(body), W, per_chunk)
    return y.reshape(-1, y.shape[-1])[: inputs.T]


def _floor_functions():
    def loss(W, inputs):
        return jnp.mean(_floor_forward(W, inputs) ** 2)

    return jax.jit(_floor_forward), jax.jit(jax.grad(loss))


def _time_interleaved(
    functions: dict[Any, tuple[Callable, tuple]],
    repeats: int,
    min_repeats: int = 1,
    budget_s: float = float("inf"),
) -> dict[Any, float]:
    """Median seconds per call of each function, timed in rounds that call every function once.

    A change of load on a shared machine then hits every method alike, so the ratios are
    side by side in time as well as in one process. Each function is called twice before
    timing (compile, then one warm call: the first call after compiling is slower). Rounds
    stop at `repeats`, or earlier once `min_repeats` rounds have taken `budget_s`.
    """
    for fn, args in functions.values():
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    times: dict[Any, list[float]] = {name: [] for name in functions}
    start = time.perf_counter()
    for round_index in range(repeats):
        for name, (fn, args) in functions.items():
            begin = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - begin)
        if round_index + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return {name: statistics.median(values) for name, values in times.items()}


def _peak_bytes(fn, args) -> int | None:
    try:
        compiled = fn.lower(*args).compile()
        compiled = getattr(compiled, "compiled", compiled)  # equinox wraps jax's Compiled
        analysis = compiled.memory_analysis()
    except Exception:  # memory analysis is not available on every backend
        return None
    if analysis is None:
        return None
    return int(
        analysis.temp_size_in_bytes
        + analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def reference_chunked_forward(W, q, k, v, lr, decay, gamma, *, window: int, chunk_size: int):
    r"""A plain chunked reference of the frozen-anchor Omega rule for a linear memory under GD
    with `l2` (per-token gates $\gamma_i$, retention $\alpha$ after the step), written as a
    reader would write it: one `lax.scan` over chunks of $b$ tokens under `jax.checkpoint`,
    everything of a chunk computed inside its step. With $R = \Phi_EW_s^\top - V_E$ at the
    chunk-start weights $W_s$, $L_\alpha[t, m] = \prod_{j=m+1}^{t}\alpha_j$, $A_t =
    \prod_{j\le t}\alpha_j$ and $\Gamma[m, j] = \gamma_j$ for the $c$ tokens of step $m$'s window,

    $$Y = A\odot(QW_s^\top) - (C\odot Q\Phi_E^\top)R,\qquad W_{s+b} = A_bW_s - (C_b\odot R)^\top
    \Phi_E,\qquad C = L_\alpha\,\mathrm{diag}(\eta)\,\Gamma.$$

    `atlas-eqx bench scan` times it beside `omega_scan(method="chunked")` (issue 23: the
    library's path should beat it); `tests/test_bench_scan.py` checks it computes the same."""
    T, b, c = v.shape[0], chunk_size, window
    n = -(-T // b)
    pad = lambda x, value=0.0: jnp.pad(x, [(0, n * b - T)] + [(0, 0)] * (x.ndim - 1),
                                       constant_values=value)  # fmt: skip
    front = lambda x: jnp.pad(x, [(c - 1, 0)] + [(0, 0)] * (x.ndim - 1))  # empty window
    k_e, v_e, g_e = front(pad(k)), front(pad(v)), front(pad(gamma))
    steps = jnp.arange(b)
    n_e = b + c - 1
    in_window = (jnp.arange(n_e)[None, :] >= steps[:, None]) & (
        jnp.arange(n_e)[None, :] < steps[:, None] + c
    )

    def chunk(W, i):
        Phi = jax.lax.dynamic_slice_in_dim(k_e, i * b, n_e)
        V = jax.lax.dynamic_slice_in_dim(v_e, i * b, n_e)
        gates = jax.lax.dynamic_slice_in_dim(g_e, i * b, n_e)
        Q = jax.lax.dynamic_slice_in_dim(pad(q), i * b, b)
        eta = jax.lax.dynamic_slice_in_dim(pad(lr), i * b, b)
        alpha = jax.lax.dynamic_slice_in_dim(pad(decay, 1.0), i * b, b)
        A = jnp.cumprod(alpha)
        L = jnp.where(steps[:, None] >= steps[None, :], A[:, None] / A[None, :], 0.0)
        C = (L * eta[None, :]) @ jnp.where(in_window, gates[None, :], 0.0)
        R = Phi @ W.T - V
        y = A[:, None] * (Q @ W.T) - (C * (Q @ Phi.T)) @ R
        return A[-1] * W - (C[-1][:, None] * R).T @ Phi, y

    _, y = jax.lax.scan(jax.checkpoint(chunk), W, jnp.arange(n))
    return y.reshape(-1, v.shape[1])[:T]


def _reference_functions(window: int, chunk_size: int):
    def forward(memory, q, k, v, lr, decay, momentum, gamma):
        del momentum  # gd
        return reference_chunked_forward(
            memory.weight, q, k, v, lr, decay, gamma, window=window, chunk_size=chunk_size
        )

    def loss(memory, q, k, v, lr, decay, momentum, gamma):
        return jnp.mean(forward(memory, q, k, v, lr, decay, momentum, gamma) ** 2)

    return eqx.filter_jit(forward), eqx.filter_jit(eqx.filter_grad(loss))


def run_scan_benchmark(config: ScanBenchConfig = ScanBenchConfig()) -> list[dict[str, Any]]:
    key = jax.random.key(0)
    rows = []
    print(
        f"omega_scan benchmark on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"d_k=d_v={config.d_k}, MLP hidden={config.hidden}, window c={config.window}, "
        f"float32, median of {config.repeats} rounds (at least {config.min_repeats}); a round "
        "calls every method once, so load changes hit all methods alike. Peak = XLA buffer assignment of the compiled "
        "forward+backward (arguments + outputs + temporaries). x = tokens/s over the first method. "
        "chunked-nsc = chunked with muon_per_chunk=True (an approximation, not the same function). "
        "floor = the linear GD dual form's chunk loop alone, its anchor-independent work (chunk "
        "layout, coefficients, the Gram C*Q Phi^T) done before timing: the chunked path's bound "
        "on this machine if everything around its chunk loop were free. reference = a plain "
        "chunked form of the same rule (`reference_chunked_forward`: one checkpointed scan over "
        "chunks, everything computed inside), the bar the library's chunked path is held to."
    )
    header = (
        f"{'setup':14s}{'T':>6s}{'b':>4s}{'method':>12s}{'fwd tok/s':>12s}{'f+b tok/s':>12s}"
        f"{'peak MiB':>10s}{'B/token':>9s}{'fwd x':>7s}{'f+b x':>7s}"
    )
    print(header)
    print("-" * len(header))
    for setup in config.setups:
        memory, optimizer = _setup(setup, config.d_k, config.d_v, config.hidden, key)
        for T in config.lengths:
            args_tail = _inputs(T, config.d_k, config.d_v, jax.random.fold_in(key, T))
            for b in config.chunk_sizes:
                methods = list(config.methods)
                if setup.endswith("muon") and "chunked" in methods:
                    methods.append("chunked-nsc")  # muon_per_chunk=True: one NS per chunk
                methods = [
                    m for m in methods if m != "sequential" or T <= config.max_sequential_length
                ]
                args = (memory, *args_tail)
                compiled = {m: _functions(memory, optimizer, config.window, b, m) for m in methods}
                args_of: dict[str, tuple] = {m: args for m in methods}
                plain_gd = not optimizer.uses_momentum and (
                    optimizer.precondition is iopt.no_precondition
                )
                if isinstance(memory, ae.LinearMemory) and plain_gd and config.reference:
                    methods.append("reference")
                    compiled["reference"] = _reference_functions(config.window, b)
                    args_of["reference"] = args
                if isinstance(memory, ae.LinearMemory) and plain_gd and config.floor:
                    methods.append("floor")
                    compiled["floor"] = _floor_functions()
                    floor_inputs = jax.jit(_floor_inputs, static_argnums=(1, 2))
                    args_of["floor"] = (
                        memory.weight,
                        floor_inputs(memory, config.window, b, *args_tail),
                    )
                seconds = {}
                gemm = {}
                if "reference" in methods:
                    gemm[("gemm", 1)] = timed_gemm(config.gemm_size, jax.random.fold_in(key, 3))
                for part in (0, 1):  # the forwards interleaved, then the forward+backwards
                    timed = {(m, part): (compiled[m][part], args_of[m]) for m in methods}
                    seconds |= _time_interleaved(
                        timed | (gemm if part else {}),
                        config.repeats,
                        config.min_repeats,
                        config.round_budget_s,
                    )
                baseline = None
                for method in methods:
                    fwd, bwd = seconds[(method, 0)], seconds[(method, 1)]
                    peak = _peak_bytes(compiled[method][1], args_of[method])
                    row: dict[str, Any] = dict(
                        setup=setup,
                        T=T,
                        b=b,
                        method=method,
                        forward_tokens_per_s=T / fwd,
                        backward_tokens_per_s=T / bwd,
                        peak_bytes=peak,
                    )
                    rows.append(row)
                    if baseline is None:
                        baseline = row
                    ratio_f = ratio_b = ""
                    if baseline is not row:
                        ratio_f = (
                            f"{row['forward_tokens_per_s'] / baseline['forward_tokens_per_s']:.1f}"
                        )
                        ratio_b = f"{row['backward_tokens_per_s'] / baseline['backward_tokens_per_s']:.1f}"
                    peak_mib = f"{peak / 2**20:.1f}" if peak is not None else "n/a"
                    per_token = f"{peak / T:.0f}" if peak is not None else "n/a"
                    print(
                        f"{setup:14s}{T:6d}{b:4d}{method:>12s}{T / fwd:12.0f}{T / bwd:12.0f}"
                        f"{peak_mib:>10s}{per_token:>9s}{ratio_f:>7s}{ratio_b:>7s}",
                        flush=True,
                    )
                if gemm:
                    print(_gemm_line(rows[-len(methods) :], compiled, args_of, seconds, config))
    return rows


def timed_gemm(n: int, key) -> tuple[Callable, tuple]:
    """A float32 `n`^3 matmul and its arguments, timed beside a benchmark's rows as the machine's
    GEMM peak ($2n^3$ FLOPs a call): `atlas-eqx bench scan` and `atlas-eqx bench flops`."""
    a, b = (jax.random.normal(k, (n, n), jnp.float32) for k in jax.random.split(key))
    return jax.jit(jnp.matmul), (a, b)


def _gemm_line(rows, compiled, args_of, seconds, config: ScanBenchConfig) -> str:
    """The forward+backward's counted FLOP rate of the chunked path and the reference, as a
    fraction of the GEMM's (timed in the same rounds)."""
    from ._flops import count_flops

    gemm_rate = 2 * config.gemm_size**3 / seconds[("gemm", 1)]
    parts = [f"GEMM {config.gemm_size}^3 {gemm_rate / 1e9:.1f} GFLOP/s"]
    for row in rows:
        method = row["method"]
        if method not in ("chunked", "reference"):
            continue
        flops = count_flops(compiled[method][1], *args_of[method]).total
        rate = flops / seconds[(method, 1)]
        row["fwd_bwd_flops_per_s"], row["fraction_of_gemm"] = rate, rate / gemm_rate
        parts.append(f"{method} f+b {rate / 1e9:.1f} GFLOP/s ({rate / gemm_rate:.0%})")
    return "    " + "; ".join(parts)

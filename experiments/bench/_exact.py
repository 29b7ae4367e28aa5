r"""`atlas-eqx bench exact`: the exact chunk-parallel form against the sequential recurrence and
fla's chunkwise delta rule (torch), side by side in one run.

The model is DeltaNet's rule with an Omega window, $W_t = W_{t-1} - \beta_t\sum_{o<c}
(W_{t-1}k_{t-o} - v_{t-o})k_{t-o}^\top$ ($\alpha = 1$, $W_0 = 0$, unit keys, $\beta_t$ uniform in
(0.1, 1)), one head and one sequence, float32. Rows:

- `sequential`: `omega_scan(method="sequential")`, the token-by-token oracle;
- `exact L=n`: `omega_scan(method="chunked", block_size=n)`, the UT-transform form
  (`atlas_eqx._exact_chunked`); every n computes the same function;
- `fla chunkwise BT=n` (c = 1 only; fla has no window): fla-core's own `delta_rule_chunkwise`
  (its plain-torch chunkwise form, `fla/ops/delta_rule/naive.py`; its Triton kernels need a
  GPU), loaded from the installed file, when torch and fla-core are installed.

Every function is timed in interleaved rounds (`experiments.bench._scan._time_interleaved`) after
two warm calls, so a change of load hits every row alike; the median is kept and the ratios
are against `sequential` in the same run. Forward+backward is the gradient of
$\sum y^2$ with respect to q, k, v and $\beta$ (the same for torch). Speed is a ratio measured
here, never a timed test.
"""

import dataclasses
import os
import pathlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import atlas_eqx as ae
from atlas_eqx._exact_chunked import DEFAULT_BLOCK_SIZE

from ._peer_packages import load_fla_naive
from ._scan import _time_interleaved


@dataclasses.dataclass(frozen=True)
class ExactBenchConfig:
    length: int = 8192
    dims: tuple[int, ...] = (64, 128)
    windows: tuple[int, ...] = (1, 3)
    block_sizes: tuple[int, ...] = (8, 16, 32, 64)
    fla_chunk_sizes: tuple[int, ...] = (32, 64)
    repeats: int = 5
    out_dir: str | None = "experiments/results/exact-chunked"


def _fla_delta_rule_chunkwise() -> Callable | None:
    """fla-core's `delta_rule_chunkwise`, or None without torch or fla-core.

    Torch's OpenMP threads spin-wait after each call by default, taking the cores from XLA
    between the interleaved calls; `OMP_WAIT_POLICY=PASSIVE` (set before torch loads) stops it.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module = load_fla_naive("delta_rule")
    return None if module is None else module.delta_rule_chunkwise


def _inputs(T: int, d: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((T, d))
    return dict(
        q=rng.standard_normal((T, d)).astype(np.float32),
        k=(k / np.linalg.norm(k, axis=1, keepdims=True)).astype(np.float32),
        v=rng.standard_normal((T, d)).astype(np.float32),
        beta=rng.uniform(0.1, 1.0, T).astype(np.float32),
    )


def _ours(d: int, window: int, method: str, block_size: int | None):
    memory = ae.LinearMemory(d, d, key=jax.random.key(0), init_std=0.0)
    memory = jax.tree.map(lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, memory)

    def forward(q, k, v, beta):
        y, _ = ae.omega_scan(
            memory,
            q,
            k,
            v,
            beta,
            jnp.ones_like(beta),
            window=window,
            method=method,  # pyright: ignore[reportArgumentType]
            block_size=block_size,
            check_values=False,
        )
        return y

    def loss(q, k, v, beta):
        return jnp.sum(forward(q, k, v, beta) ** 2)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _fla(delta_rule_chunkwise: Callable, chunk_size: int):
    import torch  # pyright: ignore[reportMissingImports]

    def forward(q, k, v, beta):
        with torch.no_grad():
            return delta_rule_chunkwise(q, k, v, beta, chunk_size)[0]

    def backward(q, k, v, beta):
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v, beta)]
        y, _ = delta_rule_chunkwise(*leaves, chunk_size)
        (y**2).sum().backward()
        return [x.grad for x in leaves]

    return forward, backward


def _output(function: tuple[Callable, tuple], d: int) -> np.ndarray:
    """A row's forward output as `(T, d)` NumPy; fla's is undone of its q scale d^-1/2."""
    fn, args = function
    y = fn(*args)
    if isinstance(y, jax.Array):
        return np.asarray(y)
    return y[0, 0].numpy() * d**0.5


def run_exact_benchmark(config: ExactBenchConfig = ExactBenchConfig()) -> list[dict[str, Any]]:
    """Print (and write to `config.out_dir/results.md`) tokens/s and ratios to `sequential`."""
    fla = _fla_delta_rule_chunkwise()
    if fla is not None:
        import torch  # pyright: ignore[reportMissingImports]

        torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores XLA uses too
    T = config.length
    header = (
        f"Exact chunk-parallel delta / Omega rule, T = {T}, one head, float32, "
        f"{jax.default_backend()}; fla chunkwise: "
        + ("fla-core's delta_rule_chunkwise (torch)" if fla is not None else "not installed")
    )
    print(header, flush=True)
    rows: list[dict[str, Any]] = []
    for d in config.dims:
        data = _inputs(T, d)
        jax_args = tuple(jnp.asarray(data[name]) for name in ("q", "k", "v", "beta"))
        for window in config.windows:
            functions: dict[tuple[str, int], tuple[Callable, tuple]] = {}
            names = ["sequential"] + [f"exact L={n}" for n in config.block_sizes]
            for name in names:
                method = "sequential" if name == "sequential" else "chunked"
                block = None if name == "sequential" else int(name.split("=")[1])
                forward, backward = _ours(d, window, method, block)
                functions[(name, 0)] = (forward, jax_args)
                functions[(name, 1)] = (backward, jax_args)
            if fla is not None and window == 1:
                import torch  # pyright: ignore[reportMissingImports]

                torch_args = tuple(
                    torch.from_numpy(data[name])[None, None] for name in ("q", "k", "v", "beta")
                )
                for n in config.fla_chunk_sizes:
                    name = f"fla chunkwise BT={n}"
                    names.append(name)
                    forward, backward = _fla(fla, n)
                    functions[(name, 0)] = (forward, torch_args)
                    functions[(name, 1)] = (backward, torch_args)
            y_sequential = np.asarray(functions[("sequential", 0)][0](*jax_args))
            differences = {
                name: float(np.abs(_output(functions[(name, 0)], d) - y_sequential).max())
                for name in names
            }
            seconds = _time_interleaved(functions, config.repeats)
            base_fwd, base_bwd = seconds[("sequential", 0)], seconds[("sequential", 1)]
            for name in names:
                fwd, bwd = seconds[(name, 0)], seconds[(name, 1)]
                row = dict(
                    d=d,
                    window=window,
                    name=name,
                    fwd_tokens_per_s=T / fwd,
                    fwd_bwd_tokens_per_s=T / bwd,
                    fwd_ratio=base_fwd / fwd,
                    fwd_bwd_ratio=base_bwd / bwd,
                    max_abs_difference=differences[name],
                )
                rows.append(row)
                print(
                    f"d={d:4d} c={window} {name:22s} fwd {T / fwd:10.0f} tok/s "
                    f"({base_fwd / fwd:5.2f}x)   fwd+bwd {T / bwd:10.0f} tok/s "
                    f"({base_bwd / bwd:5.2f}x)   max|y - y_seq| {differences[name]:.1e}",
                    flush=True,
                )
    if config.out_dir is not None:
        out = pathlib.Path(config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(format_exact_table(rows, header) + "\n")
        print(f"Wrote {out / 'results.md'}")
    return rows


TARGETS = {128: 10.0, 64: 5.0}
"""Issue 19's targets: forward+backward at least this many times the sequential path."""


def _target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets read off this run at the default execution block, and why the
    forward pass cannot gain much on a CPU."""
    default = f"exact L={DEFAULT_BLOCK_SIZE}"
    lines = [
        f"## Targets, at the default execution block ({DEFAULT_BLOCK_SIZE})",
        "",
        "| d | c | forward+backward x sequential | target | met | x fla chunkwise "
        "(best BT), forward / forward+backward |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["name"] != default or r["d"] not in TARGETS:
            continue
        target = TARGETS[r["d"]]
        peers = [
            p
            for p in rows
            if p["d"] == r["d"] and p["window"] == r["window"] and p["name"].startswith("fla")
        ]
        if peers:
            best_fwd = max(p["fwd_tokens_per_s"] for p in peers)
            best_bwd = max(p["fwd_bwd_tokens_per_s"] for p in peers)
            versus = (
                f"{r['fwd_tokens_per_s'] / best_fwd:.2f} / "
                f"{r['fwd_bwd_tokens_per_s'] / best_bwd:.2f}"
            )
        else:
            versus = "fla has no window" if r["window"] > 1 else "fla not installed"
        met = "yes" if r["fwd_bwd_ratio"] >= target else "no"
        lines.append(
            f"| {r['d']} | {r['window']} | {r['fwd_bwd_ratio']:.2f} | {target:g} | {met} | "
            f"{versus} |"
        )
    sequential_rates = ", ".join(
        f"d {r['d']} c {r['window']}: "
        f"{r['fwd_tokens_per_s'] * 2 * (2 * r['window'] + 1) * r['d'] ** 2 / 1e9:.0f}"
        for r in rows
        if r["name"] == "sequential"
    )
    lines += [
        "",
        "Why the forward pass gains less than forward+backward: per token the sequential "
        "recurrence does (2c + 1) d^2 multiply-adds (c residuals, c rank-1 writes, one read), "
        "and the block loop of the exact form about 3 d^2 (the block's rows times W, the write) "
        "plus O(L c^2 d) for the block's Gram matrix and triangular solve, so it saves at most "
        "a factor (2c + 1) / 3 in FLOPs and otherwise only runs them as matrix-matrix instead "
        "of matrix-vector products. On 2 CPU cores the sequential forward already runs at "
        f"{sequential_rates} Gflop/s in this run (its counted FLOPs over its time). Its "
        "backward pass differentiates through a per-token `jax.grad` inside `lax.scan` and is "
        "many times slower than its forward, which is where the exact form gains most. On a "
        "GPU the balance differs (fla's Triton kernels exist for that reason); this page is "
        "CPU only.",
    ]
    return lines


def format_exact_table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        "# Exact chunk-parallel form: speed against the sequential recurrence and fla",
        "",
        "Regenerate with `atlas-eqx bench exact` (protocol: `experiments/bench/_exact.py`).",
        "",
        header + ". x = ratio to `sequential` measured side by side in the same run; the last "
        "column is the largest difference of the forward output from `sequential`'s (float32 "
        "rounding: every row computes the same function).",
        "",
        "| d | c | implementation | forward tok/s | x | forward+backward tok/s | x | "
        "max abs difference to sequential |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['window']} | {r['name']} | {r['fwd_tokens_per_s']:,.0f} | "
            f"{r['fwd_ratio']:.2f} | {r['fwd_bwd_tokens_per_s']:,.0f} | {r['fwd_bwd_ratio']:.2f} | "
            f"{r['max_abs_difference']:.1e} |"
        )
    lines += ["", *_target_lines(rows)]
    return "\n".join(lines)

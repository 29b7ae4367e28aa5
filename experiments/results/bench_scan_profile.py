"""A profile behind `bench_scan_cpu.md` (its first section, with the floor row), not a benchmark: why the chunked linear GD
forward stops short of 10x the sequential oracle on a 2-core CPU.

    python experiments/results/bench_scan_profile.py

Prints, timed in interleaved rounds in one process (T = 8192, b = 64, d = 64, c = 4):

1. the rate of 64 x 64 x 64 matmuls as XLA:CPU runs them: a chain of 128 inside a loop (one
   core), 128 batched (both cores), and one (8192, 64) x (64, 64) GEMM;
2. the chunked path, the `floor` of `atlas-eqx bench scan`, and the affine form of the same
   computation (two matmuls per chunk in the loop, the rest batched before it), against the
   sequential oracle. The affine form is checked against the oracle first.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp

import atlas_eqx as ae
import optimizers as iopt
from experiments.bench import _scan as _bench


T, B, D, WINDOW, ROUNDS = 8192, 64, 64, 4, 21


def _affine_forward(memory, q, k, v, lr, decay, momentum, gamma, *, reads_in_loop: bool):
    r"""Linear memory, GD, l2: $W_{s+b} = W_sM + U$ with $M = A_bI - \Phi_E^\top
    \mathrm{diag}(C_b)\Phi_E$, $U = V_E^\top\mathrm{diag}(C_b)\Phi_E$, and
    $Y = (A\odot Q - K\Phi_E)W_s^\top + KV_E$ with $K = C\odot Q\Phi_E^\top$."""
    inputs = _bench._floor_inputs(memory, WINDOW, B, q, k, v, lr, decay, momentum, gamma)
    Phi, V, Q, K = inputs.features_e, inputs.values_e, inputs.features_q, inputs.read_gram
    A, C_end = inputs.decays, inputs.end_coefficients
    features_values = jnp.concatenate([Phi, V], -1)
    KX = jnp.matmul(K, features_values)
    Q_read, KV = A[..., None] * Q - KX[..., :D], KX[..., D:]
    Z = jnp.matmul(jnp.swapaxes(features_values, 1, 2), C_end[..., None] * Phi)
    M = A[:, -1, None, None] * jnp.eye(D, dtype=q.dtype) - Z[:, :D]
    U = Z[:, D:]
    if reads_in_loop:

        def step_and_read(W, chunk):
            M_k, U_k, Q_k, KV_k = chunk
            return W @ M_k + U_k, Q_k @ W.T + KV_k

        _, y = jax.lax.scan(jax.checkpoint(step_and_read), memory.weight, (M, U, Q_read, KV))
    else:

        def step(W, chunk):
            M_k, U_k = chunk
            return W @ M_k + U_k, W

        _, anchors = jax.lax.scan(step, memory.weight, (M, U))
        y = jnp.matmul(Q_read, jnp.swapaxes(anchors, 1, 2)) + KV
    return y.reshape(-1, D)[:T]


def _matmul_rates(key) -> None:
    n = T // B
    stack_a = jax.random.normal(key, (n, D, D)) / D
    stack_b = jax.random.normal(jax.random.fold_in(key, 1), (n, D, D)) / D
    tall = jax.random.normal(jax.random.fold_in(key, 2), (T, D))

    def chain(a, b):
        return jax.lax.scan(lambda W, M: (W @ M, W), a[0], b)[1]

    functions = {
        "loop: 128 chained matmuls": (jax.jit(chain), (stack_a, stack_b)),
        "batched: 128 matmuls": (jax.jit(jnp.matmul), (stack_a, stack_b)),
        "one (8192,64)x(64,64) GEMM": (jax.jit(jnp.matmul), (tall, stack_b[0])),
    }
    seconds = _bench._time_interleaved(functions, ROUNDS)
    flops = 2 * n * D**3
    for name, s in seconds.items():
        print(f"{name:30s} {s * 1e3:7.3f} ms  {flops / s / 1e9:6.1f} GFLOP/s")


def _forms(key) -> None:
    memory = ae.LinearMemory(D, D, key=key)
    args = _bench._inputs(T, D, D, jax.random.fold_in(key, T))
    sequential, _ = _bench._functions(memory, iopt.gd(), WINDOW, B, "sequential")
    chunked, _ = _bench._functions(memory, iopt.gd(), WINDOW, B, "chunked")
    floor, _ = _bench._floor_functions()
    floor_inputs = jax.jit(_bench._floor_inputs, static_argnums=(1, 2))(memory, WINDOW, B, *args)
    affine_in = eqx.filter_jit(functools.partial(_affine_forward, reads_in_loop=True))
    affine_after = eqx.filter_jit(functools.partial(_affine_forward, reads_in_loop=False))
    expected = sequential(memory, *args)
    for name, form in (("affine, reads in loop", affine_in), ("affine, reads after", affine_after)):
        error = jnp.max(jnp.abs(form(memory, *args) - expected)) / jnp.max(jnp.abs(expected))
        print(f"{name}: max relative difference from sequential {float(error):.1e} (float32)")
    functions = {
        "sequential": (sequential, (memory, *args)),
        "chunked": (chunked, (memory, *args)),
        "floor": (floor, (memory.weight, floor_inputs)),
        "affine, reads in loop": (affine_in, (memory, *args)),
        "affine, reads after": (affine_after, (memory, *args)),
    }
    seconds = _bench._time_interleaved(functions, ROUNDS)
    for name, s in seconds.items():
        ratio = seconds["sequential"] / s
        print(f"{name:30s} {s * 1e3:7.3f} ms  {ratio:5.2f}x sequential")


if __name__ == "__main__":
    print(f"forward, median of {ROUNDS} interleaved rounds, T={T}, b={B}, d={D}, c={WINDOW}")
    _matmul_rates(jax.random.key(1))
    _forms(jax.random.key(0))

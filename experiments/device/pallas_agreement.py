"""`method="pallas"` against `"chunked"` and `"sequential"` in float32, on whatever backend JAX
finds (Triton on a GPU, interpret mode on CPU): the first thing to run where a GPU is lent.

    python experiments/device/pallas_agreement.py

Prints one line per configuration: the largest difference of the outputs and of the gradient
with respect to the memory's weights, relative to the largest value, and exits 1 if any
exceeds 1e-4. The float64 identities are the test suite's; this checks that the compiled
kernels compute the same function on the device. Matmuls run at full float32 precision
(`jax_default_matmul_precision="highest"`): a GPU's default TF32 would differ by ~1e-3.
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp

import atlas_eqx as ae
import optimizers as iopt
from experiments.bench import _scan as _bench


TOLERANCE = 1e-4
CONFIGS = [
    ("linear", "gd", 512, 16),
    ("linear", "momentum", 512, 64),
    ("mlp", "momentum", 512, 16),
    ("mlp", "muon", 256, 16),
    ("linear", "gd", 1000, 64),  # T not a multiple of b
]


def _relative(a, b) -> float:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    scale = max(float(jnp.max(jnp.abs(x))) for x in leaves_b)
    return (
        max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(leaves_a, leaves_b, strict=True)) / scale
    )


def _agreement(memory_kind: str, optimizer_name: str, T: int, b: int) -> float:
    d, window = 64, 4
    key = jax.random.key(T + b)
    optimizer = {"gd": iopt.gd(), "momentum": iopt.momentum(), "muon": iopt.muon()}[optimizer_name]
    memory = (
        ae.LinearMemory(d, d, key=key)
        if memory_kind == "linear"
        else ae.MLPMemory(d, d, key=key, hidden=128)
    )
    q, k, v, lr, decay, momentum, gamma = _bench._inputs(T, d, d, jax.random.fold_in(key, 1))
    arrays = (q, k, v, lr, decay, momentum if optimizer.uses_momentum else None, gamma)

    def loss_and_output(memory, method):
        y, _ = ae.omega_scan(
            memory, *arrays, optimizer=optimizer, window=window, chunk_size=b, method=method
        )
        return jnp.mean(y**2), y

    function = eqx.filter_jit(eqx.filter_value_and_grad(loss_and_output, has_aux=True))
    results = {}
    for method in ("sequential", "chunked", "pallas"):
        (_, y), grad = function(memory, method)
        results[method] = (y, eqx.filter(grad, eqx.is_inexact_array))
    line, worst = [f"{memory_kind}+{optimizer_name} T={T} b={b}:"], 0.0
    for reference in ("chunked", "sequential"):
        y_error = _relative(results["pallas"][0], results[reference][0])
        grad_error = _relative(results["pallas"][1], results[reference][1])
        worst = max(worst, y_error, grad_error)
        line.append(f"pallas vs {reference} y {y_error:.1e} grad {grad_error:.1e}")
    print("  ".join(line), flush=True)
    return worst


def main() -> int:
    jax.config.update("jax_default_matmul_precision", "highest")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    worst = max(_agreement(*config) for config in CONFIGS)
    ok = worst <= TOLERANCE
    print(f"largest relative difference {worst:.1e}: {'ok' if ok else 'FAILED'} (<= {TOLERANCE})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

r"""Why atlas's outer gradient norm was ~500 on S-NIAH: the measurements of
`experiments/results/niah-extrapolate/gradient_norm.md`.

```
PYTHONPATH=. python -m experiments.studies._grad_norm          # sections 1-3, ~5 min on 2 CPU cores
PYTHONPATH=. python -m experiments.studies._grad_norm --fd     # and the float64 finite-difference check
```

1. The global norm of the outer gradient at initialisation, on one S-NIAH training batch of the
   `niah-extrapolate` run (2 prompts of 512 bytes, next-byte loss, the same models: 2 blocks,
   d_model 32, 2 heads, b = 16, c = 4), for atlas as trained there (per-chunk Muon, element-wise
   map), its variants and the other presets; with the leaves that carry it.
2. How a perturbation of $W_0$ grows through the inner recurrence: the tangent
   $\|\partial W_T/\partial W_0\,u\|$ of block 0, head 0, propagated chunk by chunk (forward
   mode) on the repeated noise haystack, as a growth factor per 16 tokens.
3. The Newton-Schulz sensitivity at the momentum that the per-chunk run reaches after 14 chunks:
   the singular values of $S/\|S\|_F$ and the operator norm of the Jacobian of $\mathrm{NS}_5$.
4. (`--fd`) float64: the gradient of the per-chunk model at T = 448 against central differences
   along $g/\|g\|$, and the loss after small steps against the gradient.
"""

import argparse
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import atlas_eqx as ae
import optimizers as iopt
from atlas_eqx._chunked import decay_matrix

from ..tasks._niah import NOISE_BLOCK, s_niah
from ..training._recall import ELEMENTWISE_FEATURES, STUDY_OPTIONS
from ..training._train import batch_loss
from ._niah_extrapolate import next_byte_targets


D_MODEL, N_LAYERS, N_HEADS, CHUNK, WINDOW = 32, 2, 2, 16, 4
NIAH_ATLAS = STUDY_OPTIONS["atlas"]  # muon_per_chunk=True, element-wise map
LR_MAX = 1.0 / (WINDOW * 2.25)  # atlas's eta_max = 1 / (c kappa), kappa = (1 + 1/2)^2

VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("atlas as trained (per-chunk Muon, b = 16)", "atlas", NIAH_ATLAS),
    ("atlas, exact per-token Muon, b = 16", "atlas", dict(ELEMENTWISE_FEATURES)),
    ("atlas, per-chunk Muon, b = 4", "atlas", {**NIAH_ATLAS, "chunk_size": 4}),
    ("atlas, per-chunk Muon, eta_max / 16", "atlas", {**NIAH_ATLAS, "lr_max": LR_MAX / 16}),
    ("atlas, momentum instead of Muon", "atlas", {**ELEMENTWISE_FEATURES, "optimizer": "momentum"}),
    ("atlas, GD instead of Muon", "atlas", {**ELEMENTWISE_FEATURES, "optimizer": "gd"}),
    (
        "atlas, identity phi (per-chunk Muon)",
        "atlas",
        {"muon_per_chunk": True, "feature_map": "identity"},
    ),
    ("atlas, identity phi, exact Muon", "atlas", {"feature_map": "identity"}),
    ("atlas, linear memory (per-chunk Muon)", "atlas", {**NIAH_ATLAS, "memory": "linear"}),
    ("atlas, linear memory, exact Muon", "atlas", {**ELEMENTWISE_FEATURES, "memory": "linear"}),
    ("titans", "titans", {}),
    ("gated_deltanet", "gated_deltanet", {}),
    ("transformer", "transformer", {}),
]


def build(preset: str, options: dict[str, Any], dtype: Any = jnp.float32) -> ae.LanguageModel:
    """The `niah-extrapolate` model of `preset` (seed 0), with `options` on its mixers."""
    mixer_options: dict[str, Any] = {}
    if preset != "transformer":
        mixer_options["chunk_size"] = CHUNK
    if preset == "atlas":
        mixer_options["window"] = WINDOW
    mixer_options.update(options)
    model = ae.LanguageModel(
        256,
        D_MODEL,
        N_LAYERS,
        N_HEADS,
        key=jax.random.key(0),
        mixer=preset,
        mixer_options=mixer_options,
    )
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)


def niah_batch(examples: int = 2, length: int = 512) -> tuple[jax.Array, jax.Array]:
    """The first `examples` prompts of the run's training set (seed 0), next-byte targets."""
    task = s_niah(examples, length, "pk", seed=0)
    return jnp.asarray(task.inputs), jnp.asarray(next_byte_targets(task))


def loss_function(model: Any, inputs: jax.Array, targets: jax.Array):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(params):
        return batch_loss(eqx.combine(params, static), inputs, targets)[0]

    return params, eqx.filter_jit(loss)


def gradient_norms(top: int = 4) -> None:
    inputs, targets = niah_batch()
    print(f"## 1. Outer gradient norm at initialisation (S-NIAH batch, 2 x {inputs.shape[1]})\n")
    print("| model | global norm | largest leaves |")
    print("|---|---|---|")
    for name, preset, options in VARIANTS:
        params, loss = loss_function(build(preset, options), inputs, targets)
        grads = eqx.filter_jit(jax.grad(loss))(params)
        leaves = jax.tree_util.tree_leaves_with_path(grads)
        largest = sorted(
            ((float(jnp.linalg.norm(g)), jax.tree_util.keystr(path)) for path, g in leaves),
            reverse=True,
        )[:top]
        cells = ", ".join(f"`{path}` {norm:.3g}" for norm, path in largest)
        print(f"| {name} | {float(optax.tree.norm(grads)):.3g} | {cells} |", flush=True)
    print("\nThe same per-chunk atlas on prefixes of the batch:\n")
    for T in (64, 128, 256, 384, 512):
        params, loss = loss_function(build("atlas", NIAH_ATLAS), inputs[:, :T], targets[:, :T])
        norm = float(optax.tree.norm(eqx.filter_jit(jax.grad(loss))(params)))
        print(f"- T = {T}: {norm:.3g}", flush=True)


def _noise_tokens(T: int) -> jax.Array:
    text = ((NOISE_BLOCK + "\n") * (T // len(NOISE_BLOCK) + 2)).encode()
    return jnp.asarray(np.frombuffer(text, np.uint8)[:T].astype(np.int32))


def _head0(tree: Any) -> Any:
    return jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, tree)


def _sq_norm(tree: Any) -> float:
    return float(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def _chunk_tangent(static: Any, phi: Any, optimizer: Any, config: Any, b: int):
    """One chunk of `omega_scan` from a state, with its forward-mode tangent."""

    @eqx.filter_jit
    def run(params, tangent, piece):
        def chunk(params):
            state = eqx.combine(params, static)
            q, k, v, lr, decay, momentum, gamma = piece
            _, new = ae.omega_scan(
                state.memory, q, k, v, lr, decay, momentum, gamma,
                feature_map=phi, optimizer=optimizer, window=config.window, chunk_size=b,
                method="chunked", state=state, muon_per_chunk=config.muon_per_chunk,
                check_values=False,
            )  # fmt: skip
            return eqx.filter(new, eqx.is_inexact_array)

        return jax.jvp(chunk, (params,), (tangent,))

    return run


def tangent_growth(T: int = 448, probe_chunks: int = 14) -> Any:
    """Section 2; returns the per-chunk run's state after `probe_chunks` chunks (section 3)."""
    print(
        f"\n## 2. Growth of a W_0 perturbation through block 0 (head 0), noise haystack, T = {T}\n"
    )
    print("| inner learner | eta_max | growth per 16 tokens | tangent at T |")
    print("|---|---|---|---|")
    tokens = _noise_tokens(T)
    probe = None
    runs: list[tuple[str, dict[str, Any], int]] = [
        ("per-chunk Muon, b = 16", NIAH_ATLAS, 16),
        ("exact Muon, b = 16", dict(ELEMENTWISE_FEATURES), 16),
        ("per-chunk Muon, b = 4", NIAH_ATLAS, 4),
        ("per-chunk Muon, b = 16, eta_max / 16", {**NIAH_ATLAS, "lr_max": LR_MAX / 16}, 16),
        ("momentum, b = 16", {**ELEMENTWISE_FEATURES, "optimizer": "momentum"}, 16),
    ]
    for name, options, b in runs:
        model = build("atlas", {**options, "chunk_size": b})
        block = model.blocks[0]
        layer = block.mixer
        assert isinstance(layer, ae.MemoryLayer)
        config = layer.config
        inputs = layer.memory_inputs(block.mixer_norm(model.embedding[tokens]))
        inputs, memory, phi = _head0(inputs), _head0(layer.memory), _head0(layer.feature_map)
        optimizer = config.inner_optimizer()
        state = ae.init_omega_state(memory, optimizer, config.window)
        params, static = eqx.partition(state, eqx.is_inexact_array)
        assert isinstance(memory, ae.MLPMemory)
        weights = memory.weights
        keys = jax.random.split(jax.random.key(3), len(weights))
        direction = [
            jax.random.normal(k, w.shape, w.dtype) for k, w in zip(keys, weights, strict=True)
        ]
        scale = _sq_norm(direction) ** 0.5
        tangent = jax.tree.map(jnp.zeros_like, params)
        tangent = eqx.tree_at(
            lambda s: s.memory.weights, tangent, tuple(d / scale for d in direction)
        )

        arrays = (inputs.q, inputs.k, inputs.v, inputs.lr, inputs.decay, inputs.momentum)
        arrays += (inputs.gamma,)
        run = _chunk_tangent(static, phi, optimizer, config, b)
        norms = []
        for n in range(T // b):
            piece = tuple(a[n * b : (n + 1) * b] for a in arrays)
            params, tangent = run(params, tangent, piece)
            norms.append(_sq_norm(tangent.memory.weights) ** 0.5)
            if (
                name.startswith("per-chunk Muon, b = 16")
                and probe is None
                and n + 1 == probe_chunks
            ):
                probe = (eqx.combine(params, static), inputs, (n + 1) * b)
        first = 64 // b - 1  # measure from token 64 on
        rate = (norms[-1] / norms[first]) ** (16 / ((len(norms) - 1 - first) * b))
        print(f"| {name} | {config.lr_max:.4f} | {rate:.3f} | {norms[-1]:.3g} |", flush=True)
    return probe


def _operator_norm(
    f: Callable[[jax.Array], jax.Array], x: jax.Array, iterations: int = 30
) -> float:
    """The largest singular value of the Jacobian of `f` at `x` (power iteration on J^T J)."""
    u = jax.random.normal(jax.random.key(0), x.shape, x.dtype)
    u = u / jnp.linalg.norm(u)
    _, vjp = jax.vjp(f, x)
    value = 0.0
    for _ in range(iterations):
        ju = jax.jvp(f, (x,), (u,))[1]
        value = float(jnp.linalg.norm(ju))
        u = vjp(ju)[0]
        u = u / jnp.linalg.norm(u)
    return value


def ns_sensitivity(probe: Any) -> None:
    state, inputs, t = probe
    print(f"\n## 3. Newton-Schulz at the per-chunk run's momentum after {t} tokens\n")
    step = float(decay_matrix(inputs.decay[t - CHUNK : t])[-1] @ inputs.lr[t - CHUNK : t])
    print(f"Step scale of that chunk, c = sum_m L_alpha[b, m] eta_m = {step:.3f}.\n")
    print("| matrix | shape | norm of S | singular values of S / norm(S): max, median, min "
          "| norm of J_NS(S) | times norm(S) | c times norm of J_NS |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for i, S in enumerate(state.optimizer_state.momentum.weights):
        norm = float(jnp.linalg.norm(S))
        sv = np.asarray(jnp.linalg.svd(S / norm, compute_uv=False))
        J = _operator_norm(lambda s: iopt.newton_schulz(s), S)
        print(
            f"| W{i + 1} | {S.shape[0]}x{S.shape[1]} | {norm:.2f} | {sv[0]:.3f}, "
            f"{np.median(sv):.3f}, {sv[-1]:.4f} | {J:.1f} | {J * norm:.0f} | {step * J:.1f} |"
        )
    a = iopt.JORDAN_COEFFICIENTS[0]
    print(f"\nFor comparison a^5 = {a**5:.1f}, the slope at 0 of the composed quintic.")


def finite_differences() -> None:
    jax.config.update("jax_enable_x64", True)
    inputs, targets = niah_batch(1)
    inputs, targets = inputs[:, :448], targets[:, :448]
    params, loss = loss_function(build("atlas", NIAH_ATLAS, jnp.float64), inputs, targets)
    grads = eqx.filter_jit(jax.grad(loss))(params)
    norm = float(optax.tree.norm(grads))
    u = jax.tree.map(lambda g: g / norm, grads)
    print("\n## 4. float64, per-chunk atlas, one prompt, T = 448\n")
    print(f"Gradient norm {norm:.8g}; central differences along g / norm(g):\n")
    for h in (1e-6, 1e-7, 1e-8):
        at = lambda k, h=h: float(loss(jax.tree.map(lambda p, d: p + k * h * d, params, u)))
        fd = (8 * (at(1) - at(-1)) - (at(2) - at(-2))) / (12 * h)
        print(f"- h = {h:g}: {fd:.8g} (relative error {abs(fd - norm) / norm:.1e})", flush=True)
    base = float(loss(params))
    print(
        "\nLoss change after a step of length h against the gradient (linear prediction -h norm):\n"
    )
    for h in (1e-5, 1e-4, 1e-3, 1e-2):
        moved = float(loss(jax.tree.map(lambda p, d, h=h: p - h * d, params, u)))
        print(f"- h = {h:g}: {moved - base:+.4g} (predicted {-h * norm:+.4g})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="atlas's outer gradient norm on S-NIAH")
    parser.add_argument("--fd", action="store_true", help="also the float64 check (~2 min)")
    args = parser.parse_args()
    begin = time.perf_counter()
    gradient_norms()
    ns_sensitivity(tangent_growth())
    if args.fd:
        finite_differences()
    print(f"\n({time.perf_counter() - begin:.0f} s)")


if __name__ == "__main__":
    main()

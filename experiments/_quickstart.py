"""The demo main job: stream key/value pairs through several memories and measure recall."""

import time
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt


@dataclass(frozen=True)
class RecallConfig:
    d_k: int = 16
    d_v: int = 16
    pairs: tuple[int, ...] = (8, 16, 32, 64, 128)
    repeats: int = 3
    seed: int = 0


def _variants(d_k: int, d_v: int, key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    poly = fm.Polynomial(2)
    d_poly = poly.out_dim(d_k)
    return {
        "deltanet (linear, c=1, GD)": dict(
            memory=ae.LinearMemory(d_k, d_v, key=k1, init_std=0.0),
            feature_map=fm.Identity(),
            optimizer=iopt.gd(),
            window=1,
            lr_scale=1.0,
        ),
        "omeganet (poly-2, c=4, GD)": dict(
            memory=ae.LinearMemory(d_poly, d_v, key=k2, init_std=0.0),
            feature_map=poly,
            optimizer=iopt.gd(),
            window=4,
            lr_scale=0.5,
        ),
        "titans (MLP, c=1, momentum)": dict(
            memory=ae.MLPMemory(d_k, d_v, key=k3, init_std=0.1),
            feature_map=fm.Identity(),
            optimizer=iopt.momentum(),
            window=1,
            lr_scale=0.1,
        ),
        "atlas (poly-2 MLP, c=4, Muon)": dict(
            memory=ae.MLPMemory(d_poly, d_v, key=k4, init_std=0.1, hidden=64),
            feature_map=poly,
            optimizer=iopt.muon(),
            window=4,
            lr_scale=0.3,
        ),
    }


@eqx.filter_jit
def _recall_error(memory, feature_map, optimizer, window, lr_scale, keys, values, repeats):
    """Write all pairs `repeats` times, then read every key; relative squared error."""
    stream_k = jnp.tile(keys, (repeats, 1))
    stream_v = jnp.tile(values, (repeats, 1))
    T = stream_k.shape[0]
    phi = feature_map(stream_k)
    lr = lr_scale / jnp.sum(phi * phi, axis=-1)
    momentum = jnp.full((T,), 0.5) if optimizer.uses_momentum else None
    _, state = ae.omega_scan(
        memory,
        stream_k,
        stream_k,
        stream_v,
        lr,
        jnp.ones((T,)),
        momentum,
        feature_map=feature_map,
        optimizer=optimizer,
        window=window,
    )
    recalled = jax.vmap(state.memory)(feature_map(keys))
    error = jnp.sum((recalled - values) ** 2, -1) / jnp.sum(values**2, -1)
    return jnp.mean(error)


def run_quickstart(config: RecallConfig = RecallConfig()) -> dict[str, list[float]]:
    key = jax.random.key(config.seed)
    variants = _variants(config.d_k, config.d_v, key)
    print(
        f"atlas-eqx quickstart on {jax.default_backend()}: write N random unit-key/value pairs "
        f"{config.repeats}x into each memory (d_k={config.d_k}), then recall every key.\n"
        "Relative recall error ||M(phi(k)) - v||^2 / ||v||^2 (lower is better):\n"
    )
    header = f"{'memory':34s}" + "".join(f"{'N=' + str(n):>9s}" for n in config.pairs)
    print(header + f"{'tok/s':>10s}")
    print("-" * (len(header) + 10))
    results = {}
    for name, variant in variants.items():
        errors = []
        elapsed = 0.0
        tokens = 0
        for n in config.pairs:
            kk, kv = jax.random.split(jax.random.fold_in(key, n))
            keys = jax.random.normal(kk, (n, config.d_k))
            keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
            values = jax.random.normal(kv, (n, config.d_v))
            args = (
                variant["memory"],
                variant["feature_map"],
                variant["optimizer"],
                variant["window"],
                variant["lr_scale"],
                keys,
                values,
                config.repeats,
            )
            _recall_error(*args).block_until_ready()  # compile
            start = time.perf_counter()
            error = float(_recall_error(*args))
            elapsed += time.perf_counter() - start
            tokens += n * config.repeats
            errors.append(error)
        results[name] = errors
        row = f"{name:34s}" + "".join(f"{e:9.3f}" for e in errors)
        print(row + f"{tokens / elapsed:10.0f}")
    print(
        f"\nA linear memory holds about d_k={config.d_k} pairs; degree-2 features raise the bound "
        f"to C(d_k+2, 2)={fm.Polynomial(2).out_dim(config.d_k)} (digest 3.4)."
    )
    return results

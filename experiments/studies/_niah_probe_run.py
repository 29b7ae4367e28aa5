"""`atlas-eqx results niah-probe`, the measurement: write one needle key/value into a memory
among up to 1M haystack tokens, streamed in pieces with the carried `omega_scan` state, read
it back at the end; accuracy, tokens/s and resident memory against length. The library's own
memories and update rules; nothing is trained by an outer loop. The page: `_niah_probe_page.py`.
"""

import dataclasses
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt

from ..tasks._corpus import load_excerpt
from ..tasks._niah import NOISE_BLOCK
from ._memory_stats import _current_rss_mib, _rss_mib, _state_floats, _unit


@dataclasses.dataclass(frozen=True)
class NiahProbeConfig:
    """Sizes of `atlas-eqx results niah-probe` (`quick` uses `QUICK_NIAH`)."""

    lengths: tuple[int, ...] = (1024, 4096, 16384, 65536, 262144, 1048576)
    examples: int = 8
    key_dim: int = 16
    value_dim: int = 32
    context: int = 4
    codebook: int = 256
    piece: int = 4096
    seed: int = 0
    memories: tuple[str, ...] | None = None  # names of `probe_memories()`; None: all
    haystacks: tuple[str, ...] = ("noise", "essay")


QUICK_NIAH = NiahProbeConfig(
    lengths=(256,), examples=2, piece=256, memories=("deltanet",), haystacks=("noise",)
)


@dataclasses.dataclass(frozen=True)
class ProbeMemory:
    """One memory of the probe: `omega_scan` with `feature_map`, window `c`, `objective`,
    GD, $\\alpha = 1$, and $\\eta_t = 1/(c\\|\\phi(k_t)\\|^2)$ for `l2` (1 for `dot`)."""

    name: str
    feature_map: fm.AbstractFeatureMap
    window: int
    objective: Callable
    description: str


def probe_memories() -> tuple[ProbeMemory, ...]:
    """The memories compared by the probe (all `LinearMemory` from $W_0 = 0$)."""
    return (
        ProbeMemory(
            "linear_attention",
            fm.Identity(),
            1,
            ae.dot,
            "phi = id, Hebbian (`ae.dot`), eta = 1",
        ),
        ProbeMemory("deltanet", fm.Identity(), 1, ae.l2, "phi = id, delta rule (`ae.l2`), c = 1"),
        ProbeMemory(
            "linear Omega c=4, Taylor phi",
            fm.Polynomial(2),
            4,
            ae.l2,
            "phi = `Polynomial(2)` (a = 1, 1, 1/2: dim 153), Omega window c = 4, GD",
        ),
        ProbeMemory(
            "linear Omega c=4, degree-2 phi",
            fm.Polynomial(2, include_constant=False, coefficients=(1e-4, 1.0)),
            4,
            ae.l2,
            "phi = `Polynomial(2, include_constant=False, coefficients=(1e-4, 1))` "
            "(dim 152, the degree-2 block carries the norm), c = 4, GD",
        ),
    )


HAYSTACKS = ("noise", "essay")


def haystack_bytes(kind: str) -> Int[np.ndarray, " L"]:
    """The haystack text, cycled by the probe: RULER's noise block (`"noise"`, S-NIAH-PK,
    the block plus the newline that joins blocks) or the shipped public-domain excerpt
    (`"essay"`, whitespace-collapsed, in place of RULER's Paul Graham essays)."""
    if kind == "noise":
        text = NOISE_BLOCK + "\n"
    elif kind == "essay":
        text = " ".join(load_excerpt().split()) + " "
    else:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {kind!r}")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def distinct_contexts(kind: str, context: int) -> int:
    """How many distinct `context`-byte windows the cycled haystack text has (= how many
    distinct haystack keys the probe writes)."""
    text = haystack_bytes(kind)
    windows = text[(np.arange(text.shape[0])[:, None] - np.arange(context)[None, :]) % len(text)]
    return len(np.unique(windows, axis=0))


class _ProbeTables(eqx.Module):
    key_table: Float[Array, "n 256 d_k"]
    value_table: Float[Array, "n 256 d_v"]
    codebook: Float[Array, "C d_v"]


def probe_tables(config: NiahProbeConfig) -> _ProbeTables:
    r"""The fixed random projections: $k_t = \mathrm{normalise}(\sum_{j<n} A_j[x_{t-j}])$ and
    $v_t = \mathrm{normalise}(\sum_{j<n} B_j[x_{t-j}])$ of the last $n$ = `context` bytes (a
    short causal convolution of a random embedding, as a layer's key and value projections of
    one hidden state), and `codebook` unit values from which the needle's value is drawn."""
    rng = np.random.default_rng(config.seed)
    n, d_k, d_v = config.context, config.key_dim, config.value_dim
    return _ProbeTables(
        jnp.asarray(rng.standard_normal((n, 256, d_k)), jnp.float32),
        jnp.asarray(rng.standard_normal((n, 256, d_v)), jnp.float32),
        _unit(jnp.asarray(rng.standard_normal((config.codebook, d_v)), jnp.float32)),
    )


def haystack_keys_values(
    tables: _ProbeTables, text: Int[Array, " L"], positions: Int[Array, " P"], start: Int[Array, ""]
) -> tuple[Float[Array, "P d_k"], Float[Array, "P d_v"]]:
    """Keys and values of the haystack at `positions` of the text cycled from `start`."""
    n = tables.key_table.shape[0]
    length = text.shape[0]
    context = text[(start + positions[:, None] - jnp.arange(n)[None, :]) % length]
    offsets = jnp.arange(n)[None, :]
    keys = _unit(jnp.sum(tables.key_table[offsets, context], axis=1))
    values = _unit(jnp.sum(tables.value_table[offsets, context], axis=1))
    return keys, values


def needle_outside_span(
    memory: ProbeMemory,
    tables: _ProbeTables,
    kind: str,
    needle_keys: Float[np.ndarray, "E d_k"],
) -> Float[np.ndarray, " E"]:
    r"""$\rho = \|(I - P)\phi(k_{needle})\|^2 / \|\phi(k_{needle})\|^2$, with $P$ the
    projection onto the span of the features of every haystack key of the cycled text.

    A delta-rule write of a haystack token changes $W$ only along its own $\phi(k_t)$, so
    only the part $(I - P)\phi(k_{needle})$ of the needle's write is safe from the haystack.
    """
    text = jnp.asarray(haystack_bytes(kind))
    keys, _ = haystack_keys_values(tables, text, jnp.arange(text.shape[0]), jnp.asarray(0))
    features = np.asarray(memory.feature_map(keys), dtype=np.float64)
    _, singular, vt = np.linalg.svd(features, full_matrices=False)
    basis = vt[singular > 1e-5 * singular[0]]
    needle = np.asarray(memory.feature_map(jnp.asarray(needle_keys)), dtype=np.float64)
    inside = ((needle @ basis.T) ** 2).sum(axis=1)
    return np.clip(1.0 - inside / (needle**2).sum(axis=1), 0.0, 1.0)


def _probe_fns(memory: ProbeMemory, lin: ae.LinearMemory, tables, text, size: int):
    phi, c = memory.feature_map, memory.window
    hebbian = memory.objective is ae.dot

    def write(state, offset, start, needle_position, needle_key, needle_value):
        positions = offset + jnp.arange(size)
        k, v = haystack_keys_values(tables, text, positions, start)
        is_needle = (positions == needle_position)[:, None]
        k = jnp.where(is_needle, needle_key, k)
        v = jnp.where(is_needle, needle_value, v)
        if hebbian:
            lr = jnp.ones(size, k.dtype)
        else:
            lr = 1.0 / (c * jnp.sum(phi(k) ** 2, axis=-1))
        _, state = ae.omega_scan(
            lin,
            k,
            k,
            v,
            lr,
            jnp.ones(size, k.dtype),
            feature_map=phi,
            objective=memory.objective,
            optimizer=iopt.gd(),
            window=c,
            state=state,
            check_values=False,
        )
        return state

    def read(state, needle_key):
        y, _ = ae.omega_scan(
            lin,
            needle_key[None],
            needle_key[None],
            jnp.zeros((1, lin.d_out), needle_key.dtype),
            jnp.zeros((1,), needle_key.dtype),
            jnp.ones((1,), needle_key.dtype),
            feature_map=phi,
            objective=memory.objective,
            optimizer=iopt.gd(),
            window=c,
            state=state,
            check_values=False,
        )
        return y[0]

    write_fn = jax.jit(jax.vmap(write, in_axes=(0, None, 0, 0, 0, 0)))
    return write_fn, jax.jit(jax.vmap(read))


def run_niah_probe(
    config: NiahProbeConfig = NiahProbeConfig(),
    memories: tuple[ProbeMemory, ...] | None = None,
    haystacks: tuple[str, ...] = HAYSTACKS,
    *,
    depths: Float[np.ndarray, " E"] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run the probe; one record per (haystack, memory, length).

    For each length `T` and example `e`: the haystack starts at a random offset of the
    cycled text; the needle (a random unit key and a random codebook value) replaces the
    token at position `int(depth_e * T)`, `depth_e` uniform in `[0, 1)` (or `depths`); all
    `T` tokens are written in pieces of `config.piece` with the carried state; then the needle
    key is read with $\\eta = 0$. Correct iff the codebook value nearest (cosine) to the read
    is the needle's value (chance `1 / codebook`).
    """
    memories = probe_memories() if memories is None else memories
    tables = probe_tables(config)
    records = []
    pending = []
    for kind in haystacks:
        text = jnp.asarray(haystack_bytes(kind))
        for memory in memories:
            dim = memory.feature_map.out_dim(config.key_dim)
            lin = ae.LinearMemory(dim, config.value_dim, key=jax.random.key(0), init_std=0.0)
            fns = {}
            for length in config.lengths:
                size = min(length, config.piece)
                if length % size:
                    raise ValueError(f"length {length} is not a multiple of the piece {size}")
                rng = np.random.default_rng((config.seed, length))
                e = config.examples
                starts = jnp.asarray(rng.integers(0, text.shape[0], e), jnp.int32)
                depth = rng.uniform(0.0, 1.0, e) if depths is None else np.asarray(depths)
                positions = jnp.asarray(np.minimum((depth * length).astype(np.int64), length - 1))
                positions = positions.astype(jnp.int32)
                keys = _unit(jnp.asarray(rng.standard_normal((e, config.key_dim)), jnp.float32))
                answers = rng.integers(0, config.codebook, e)
                values = tables.codebook[jnp.asarray(answers)]
                state0 = jax.vmap(
                    lambda _, lin=lin, c=memory.window: ae.init_omega_state(lin, iopt.gd(), c)
                )(jnp.arange(e))
                if size not in fns:
                    write, read = _probe_fns(memory, lin, tables, text, size)
                    offset = jnp.asarray(0, jnp.int32)
                    fns[size] = (
                        write.lower(state0, offset, starts, positions, keys, values).compile(),
                        read.lower(state0, keys).compile(),
                    )
                write, read = fns[size]
                begin = time.perf_counter()
                state = state0
                for offset in range(0, length, size):
                    state = write(
                        state, jnp.asarray(offset, jnp.int32), starts, positions, keys, values
                    )
                    # one piece in flight at a time: the memory in use does not grow with T
                    state = jax.block_until_ready(state)
                y = read(state, keys)
                predicted = np.asarray(jnp.argmax(_unit(y) @ tables.codebook.T, axis=1))
                seconds = time.perf_counter() - begin
                record = {
                    "haystack": kind,
                    "memory": memory.name,
                    "length": length,
                    "accuracy": float(np.mean(predicted == answers)),
                    "correct": [bool(c) for c in predicted == answers],
                    "tokens_per_s": e * length / seconds,
                    "seconds": seconds,
                    "peak_rss_mib": _rss_mib(),
                    "rss_mib": _current_rss_mib(),
                    "state_floats": _state_floats(jax.tree.map(lambda x: x[0], state0)),
                    "outside_span": None,  # filled in after every stream has run
                }
                records.append(record)
                pending.append((record, memory, kind, np.asarray(keys)))
                if progress:
                    print(
                        f"{kind:6s} {memory.name:26s} T={length:8d} acc={record['accuracy']:.3f} "
                        f"{record['tokens_per_s']:10,.0f} tok/s peak RSS {record['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
    # The span diagnostic runs last, so that the peak RSS recorded above is the streams' alone.
    for record, memory, kind, keys in pending:
        record["outside_span"] = float(np.mean(needle_outside_span(memory, tables, kind, keys)))
    return records

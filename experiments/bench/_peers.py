r"""`atlas-eqx bench peers`: our memory layers against titans-pytorch, side by side in one run.

Five parts (issue 8, items 1 to 5; item 4, streaming inference, is `experiments.bench._stream`
and writes its own `stream.md`):

1. **Matched layers.** Our `titans` preset (and `atlas` beside it) against titans-pytorch's
   `NeuralMemory` at the same width, heads, chunk, length, batch 2 and float32: forward and
   forward+backward tokens/s and peak memory. titans-pytorch runs twice: with its default
   `batch_size=None` (every surprise gradient of the sequence is taken at the sequence-start
   weights) and with `batch_size=chunk` (gradients at the weights after the previous chunk,
   the paper's semantics and ours).
2. **Numerical cross-check** where the definitions coincide (`cross_check`): titans-pytorch
   reduced to `chunk_size=1` (its gates, reads and batches then work per token) is our
   `omega_scan` with `chunk_size` equal to its `batch_size`, for a linear memory with
   $W_0 = 0$ and no momentum (DeltaNet) and for the deep memory with momentum and retention
   when $\eta$ is constant; fla's own `delta_rule_recurrence` is our `deltanet` at
   `chunk_size=1`. Where they differ by definition (a per-token $\eta$ with momentum, I-15;
   our frozen-anchor chunks against fla's exact chunkwise delta rule) the difference is
   printed as such.
3. **Language-model training step** of our `transformer` preset against recurrent presets at
   T in {512, 2048, 8192}.
4. **Streaming inference** (part `stream`, `experiments.bench._stream`): tokens/s and resident
   memory of a memory-only atlas scan (and titans) streamed at 16K, 128K and 1M tokens (10M
   with `--ten-million`), one subprocess per length: `stream.md` and `stream.png`.
5. **Output**: `results.md` (tables, ratios ours/peer) and `throughput.png`.

**How it is measured.** Every (implementation, configuration) runs in a fresh Python
subprocess pinned to two CPUs (`os.sched_setaffinity` before jax or torch is imported,
`torch.set_num_threads(2)`, `OMP_NUM_THREADS=2`; XLA sizes its pool from the affinity mask): it builds the layer, runs one warm-up call (its time is the
"first call", compilation for JAX), then `repeats` timed calls, and keeps the median; first
the forward, then the forward+backward (gradient of `mean(y**2)` with respect to every
parameter; torch forward under `torch.no_grad()`). **Peak memory** is the subprocess's
`VmHWM` (the high-water mark of resident memory over the whole child: imports, build,
compilation, forward and forward+backward), reported beside the resident memory right after
the imports, so both frameworks are measured by the same rule; `tracemalloc` would not see
XLA's or torch's allocators. Not `ru_maxrss`: Linux carries the parent's high-water mark
into a child started by `subprocess` (fork or vfork, then exec), so a child's `ru_maxrss` is
at least the parent's peak at the time of the spawn (measured: a 600 MiB parent gives a bare
Python child `ru_maxrss` 614 MiB and `VmHWM` 13 MiB); before this was noticed (the stream
part) the peak RSS of `results.md` was `ru_maxrss`, so a row's peak there may be the
parent's. For JAX the compiled forward+backward's own buffer assignment (`memory_analysis`:
arguments + outputs + temporaries) is given too.
"""

import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._plot import pyplot_or_none, save_figure
from ._stream import DEFAULT_STREAM_CONFIG, StreamBenchConfig, write_stream_results


TORCH_VERSION = "2.13.0"
TITANS_VERSION = "0.5.5"
FLA_CORE_VERSION = "0.5.2"
INSTALL_HINT = (
    "pip install 'atlas-eqx[bench]'  (or by hand: pip install torch==2.13.0 "
    "titans-pytorch==0.5.5 fla-core==0.5.2; on a CPU-only machine install the +cpu torch "
    "first, e.g. pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu: "
    "an unpinned torch pulls a CUDA build of several GB)"
)


class PeersMissing(RuntimeError):
    """torch or titans-pytorch is not installed; the message says what to install."""


def require_peers() -> tuple[Any, Any]:
    """Import torch and titans_pytorch, or raise `PeersMissing` naming the missing package and
    the install command."""
    modules = []
    for name in ("torch", "titans_pytorch"):  # torch first: titans-pytorch imports it
        try:
            modules.append(importlib.import_module(name))
        except ImportError as error:
            raise PeersMissing(
                f"atlas-eqx bench peers compares against titans-pytorch and needs torch and "
                f"titans-pytorch, which are not installed (missing: {name}). Install them "
                f"with: {INSTALL_HINT}"
            ) from error
    return modules[0], modules[1]


def load_fla_naive(ops_module: str) -> types.ModuleType | None:
    """fla-core's plain-torch reference file `fla/ops/<ops_module>/naive.py` (for example
    `delta_rule` or `gated_delta_rule`), loaded from the installed file without importing
    `fla.ops`, whose Triton kernels need `triton`. `None` if torch or fla-core is not
    installed."""
    if importlib.util.find_spec("torch") is None:
        return None
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / "ops" / ops_module / "naive.py"
        if path.is_file():
            module_spec = importlib.util.spec_from_file_location(f"_fla_{ops_module}_naive", path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
    return None


def load_fla_naive_delta_rule() -> Callable | None:
    """fla's own `delta_rule_recurrence` (`load_fla_naive("delta_rule")`), or `None`."""
    module = load_fla_naive("delta_rule")
    return None if module is None else module.delta_rule_recurrence


# ---------------------------------------------------------------------------------------------
# Item 2: the numerical cross-check.


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _gelu_exact(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GELU with the exact erf (torch's default) and its derivative."""
    erf = np.vectorize(math.erf)
    cdf = 0.5 * (1.0 + erf(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return z * cdf, cdf + z * pdf


def numpy_titans_reference(
    weights: Sequence[np.ndarray],
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    lr: np.ndarray,
    keep: np.ndarray,
    momentum: np.ndarray | None,
    batch_size: int | None,
) -> np.ndarray:
    r"""titans-pytorch's `NeuralMemory` update rule at `chunk_size=1`, written out in NumPy.

    Memory in titans-pytorch's layout (rows are tokens): $M(x) = x W_1$ (one weight) or
    $\mathrm{GELU}(x W_1) W_2$ (two), without its `ResidualNorm`. Loss
    $\ell_t = \mathrm{mean}((M(k_t) - v_t)^2)$ weighted by $\eta_t$; every gradient of a
    batch of `batch_size` tokens is taken at the weights $W_a$ of the batch start (`None`:
    one batch, the sequence start). Surprise $u_t = -\eta_t\nabla\ell_t(W_a)$, momentum
    $S_t = \theta_tS_{t-1} + u_t$ (or $S_t = u_t$), weights $W_t = \kappa_tW_{t-1} + S_t$
    with $\kappa_t$ = `keep` ($1 - $ their decay factor), read $y_t = M(q_t; W_t)$.
    """
    T, d = v.shape
    batch = T if batch_size is None else batch_size
    W = [w.astype(np.float64).copy() for w in weights]
    S = [np.zeros_like(w) for w in W]
    anchor = [w.copy() for w in W]
    out = np.zeros((T, d))
    for t in range(T):
        if t % batch == 0:
            anchor = [w.copy() for w in W]
        scale = 2.0 * lr[t] / d
        if len(W) == 1:
            residual = k[t] @ anchor[0] - v[t]
            grads = [scale * np.outer(k[t], residual)]
        else:
            z = k[t] @ anchor[0]
            h, dh = _gelu_exact(z)
            residual = h @ anchor[1] - v[t]
            grads = [
                scale * np.outer(k[t], (anchor[1] @ residual) * dh),
                scale * np.outer(h, residual),
            ]
        for i, g in enumerate(grads):
            S[i] = (momentum[t] * S[i] if momentum is not None else 0.0) - g
            W[i] = keep[t] * W[i] + S[i]
        if len(W) == 1:
            out[t] = q[t] @ W[0]
        else:
            out[t] = _gelu_exact(q[t] @ W[0])[0] @ W[1]
    return out


def numpy_delta_rule(q: np.ndarray, k: np.ndarray, v: np.ndarray, beta: np.ndarray) -> np.ndarray:
    r"""DeltaNet token by token from $S_0 = 0$: $S_t = S_{t-1}(I - \beta_tk_tk_t^\top) +
    \beta_tv_tk_t^\top$, $y_t = S_tq_t$ (fla's naive recurrence without its $d^{-1/2}$ on q)."""
    S = np.zeros((v.shape[1], k.shape[1]))
    out = np.zeros_like(v, dtype=np.float64)
    for t in range(v.shape[0]):
        S = S + beta[t] * np.outer(v[t] - S @ k[t], k[t])
        out[t] = S @ q[t]
    return out


def _ours_titans_rule(
    weights: Sequence[np.ndarray],
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    lr: np.ndarray,
    keep: np.ndarray,
    momentum: np.ndarray | None,
    chunk_size: int,
) -> np.ndarray:
    """Our `omega_scan(method="chunked")` on the same memory (weights transposed to our
    `(d_out, d_in)` layout), in float32: $\\eta = 2\\eta_t/d$ (their mean-squared loss is
    $2/d$ times our $\\tfrac12\\|\\cdot\\|^2$), $\\alpha$ = `keep`, c = 1."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import atlas_eqx as ae
    import optimizers as iopt

    d = v.shape[1]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    if len(weights) == 1:
        memory: Any = ae.LinearMemory(d, d, key=jax.random.key(0))
        memory = eqx.tree_at(lambda m: m.weight, memory, f32(weights[0].T))
    else:
        hidden = weights[0].shape[1]
        gelu = functools.partial(jax.nn.gelu, approximate=False)
        memory = ae.MLPMemory(
            d, d, key=jax.random.key(0), hidden=hidden, residual=False, activation=gelu
        )
        memory = eqx.tree_at(lambda m: m.weights, memory, tuple(f32(w.T) for w in weights))
    y, _ = ae.omega_scan(
        memory,
        f32(q),
        f32(k),
        f32(v),
        f32(2.0 * lr / d),
        f32(keep),
        None if momentum is None else f32(momentum),
        optimizer=iopt.gd() if momentum is None else iopt.momentum(),
        window=1,
        chunk_size=chunk_size,
        method="chunked",
    )
    return np.asarray(y, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class CrossCheckCase:
    name: str
    memory: str  # "linear" (W_0 = 0, no momentum, alpha = 1: DeltaNet) or "mlp"
    batch_size: int | None  # titans-pytorch's batch_size = our chunk_size (None: T)
    constant_lr: bool
    expect_equal: bool


CROSS_CHECK_CASES = (
    CrossCheckCase("deltanet: linear, W0=0, no momentum, alpha=1; b=1", "linear", 1, False, True),
    CrossCheckCase("deltanet rule, frozen anchor: b=8", "linear", 8, False, True),
    CrossCheckCase("titans: MLP, momentum, decay, const eta; b=1", "mlp", 1, True, True),
    CrossCheckCase("titans: MLP, momentum, decay, const eta; b=8", "mlp", 8, True, True),
    CrossCheckCase(
        "titans: MLP, momentum, decay, const eta; batch_size=None = our b=T",
        "mlp",
        None,
        True,
        True,
    ),
    CrossCheckCase("titans: per-token eta with momentum (I-15)", "mlp", 8, False, False),
)


def _cross_check_parameters(case: CrossCheckCase, T: int, d: int, seed: int) -> dict[str, Any]:
    """A sequence `x` and titans-pytorch-shaped parameters: projections `(d, d)` in torch's
    `(out, in)` layout, gate weights and biases, memory weights in its `(in, out)` layout."""
    rng = np.random.default_rng(seed)
    proj = lambda: 0.5 * rng.normal(size=(d, d)) / math.sqrt(d)  # ||k||^2 ~ 1/4 d
    params: dict[str, Any] = dict(x=rng.normal(size=(T, d)), q=proj(), k=proj(), v=proj())
    gate = lambda bias: (rng.normal(size=d) / math.sqrt(d), bias)
    params["lr"] = (np.zeros(d), math.log(0.7 / 0.3)) if case.constant_lr else gate(0.0)
    if case.memory == "linear":
        params["weights"] = [np.zeros((d, d))]
        params["decay"] = (np.zeros(d), -200.0)  # 1 - sigmoid(-200) = 1 exactly
        params["momentum"] = None
    else:
        hidden = 2 * d
        params["weights"] = [
            rng.normal(size=(d, hidden)) / math.sqrt(d),
            rng.normal(size=(hidden, d)) / math.sqrt(hidden),
        ]
        params["decay"] = gate(-2.5)
        params["momentum"] = gate(0.0)
    return params


def _cross_check_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """The per-token memory inputs titans-pytorch computes from `params` (float64)."""
    x = params["x"]
    gate = lambda wb: _sigmoid(x @ wb[0] + wb[1])
    return dict(
        weights=params["weights"],
        q=x @ params["q"].T,
        k=x @ params["k"].T,
        v=x @ params["v"].T,
        lr=gate(params["lr"]),  # default_step_transform_max_lr = 1
        keep=1.0 - gate(params["decay"]),
        momentum=None if params["momentum"] is None else gate(params["momentum"]),
    )


def cross_check_numpy(T: int = 32, d: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Our `omega_scan` against the NumPy transcription of titans-pytorch's rule
    (`numpy_titans_reference`) and against DeltaNet's recurrence; needs no torch."""
    rows = []
    for case in CROSS_CHECK_CASES:
        inputs = _cross_check_inputs(_cross_check_parameters(case, T, d, seed))
        b = T if case.batch_size is None else case.batch_size
        reference = numpy_titans_reference(**inputs, batch_size=case.batch_size)
        ours = _ours_titans_rule(**inputs, chunk_size=b)
        rows.append(
            _row(case.name, "NumPy titans-pytorch rule", ours, reference, case.expect_equal)
        )
    inputs = _cross_check_inputs(_cross_check_parameters(CROSS_CHECK_CASES[0], T, d, seed))
    beta = 2.0 * inputs["lr"] / d
    reference = numpy_delta_rule(inputs["q"], inputs["k"], inputs["v"], beta)
    ours = _ours_titans_rule(**inputs, chunk_size=1)
    rows.append(_row("deltanet closed form, b=1", "NumPy delta rule", ours, reference, True))
    return rows


def _row(
    name: str, reference_name: str, ours: np.ndarray, reference: np.ndarray, expect_equal: bool
) -> dict[str, Any]:
    error = float(np.max(np.abs(ours - reference)))
    scale = float(np.max(np.abs(reference)))
    tolerance = 1e-5 * max(scale, 1.0)  # float32 with O(T) accumulated roundings
    agree = error <= tolerance
    return dict(
        case=name,
        reference=reference_name,
        max_abs_error=error,
        max_abs_output=scale,
        tolerance=tolerance,
        expect_equal=expect_equal,
        agree=agree,
        passed=agree == expect_equal,
    )


def _titans_pytorch_outputs(
    case: CrossCheckCase, T: int, d: int, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """titans-pytorch's `NeuralMemory` reduced to `chunk_size=1` (one head, no RMSNorms, no
    `ResidualNorm`, depth-1 or depth-2 `MemoryMLP`), in float64, with the parameters of
    `_cross_check_parameters` loaded; returns its output and the inputs its memory saw."""
    torch, _ = require_peers()
    from titans_pytorch import NeuralMemory  # pyright: ignore[reportMissingImports]
    from titans_pytorch.memory_models import MemoryMLP  # pyright: ignore[reportMissingImports]

    params = _cross_check_parameters(case, T, d, seed)
    torch.manual_seed(seed)
    memory = NeuralMemory(
        d,
        chunk_size=1,
        batch_size=case.batch_size,
        model=MemoryMLP(d, depth=len(params["weights"]), expansion_factor=2.0),
        mem_model_norm_add_residual=False,
        momentum=params["momentum"] is not None,
        pre_rmsnorm=False,
    ).double()
    tensor = lambda a: torch.from_numpy(np.asarray(a, np.float64))
    _set_linear(torch, memory.to_queries, tensor(params["q"]))
    _set_linear(torch, memory.to_keys, tensor(params["k"]))
    _set_linear(torch, memory.to_values, tensor(params["v"]))
    for module, name in ((memory.to_adaptive_step, "lr"), (memory.to_decay_factor, "decay")):
        _set_linear(torch, module, tensor(params[name][0])[None], params[name][1])
    if params["momentum"] is not None:
        w, b = params["momentum"]
        _set_linear(torch, memory.to_momentum, tensor(w)[None], b)
    with torch.no_grad():
        for parameter, weight in zip(
            memory.memory_model_parameters, params["weights"], strict=True
        ):
            parameter.copy_(tensor(weight)[None])
        y, _ = memory(tensor(params["x"])[None])
    return y[0].numpy(), _cross_check_inputs(params)


def _set_linear(torch: Any, module: Any, weight: Any, bias: float | None = None) -> None:
    linear = module if isinstance(module, torch.nn.Linear) else module[0]
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.fill_(bias)


def cross_check_peers(T: int = 32, d: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Our `omega_scan` (float32) against titans-pytorch's `NeuralMemory` (run in float64)
    and, if fla-core is installed, fla's naive delta rule (float32). Needs torch."""
    torch, _ = require_peers()
    rows = []
    for case in CROSS_CHECK_CASES:
        theirs, inputs = _titans_pytorch_outputs(case, T, d, seed)
        b = T if case.batch_size is None else case.batch_size
        ours = _ours_titans_rule(**inputs, chunk_size=b)
        rows.append(_row(case.name, "titans-pytorch NeuralMemory", ours, theirs, case.expect_equal))
        numpy_ref = numpy_titans_reference(**inputs, batch_size=case.batch_size)
        rows.append(
            _row(case.name, "titans-pytorch = its NumPy transcription", numpy_ref, theirs, True)
        )
    naive = load_fla_naive_delta_rule()
    if naive is not None:
        inputs = _cross_check_inputs(_cross_check_parameters(CROSS_CHECK_CASES[0], T, d, seed))
        beta = 2.0 * inputs["lr"] / d
        to_torch = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None, None]
        # fla scales q by d^-1/2 inside; feed it sqrt(d) q so that both read S q.
        o, _ = naive(
            to_torch(math.sqrt(d) * inputs["q"]),
            to_torch(inputs["k"]),
            to_torch(inputs["v"]),
            to_torch(beta),
        )
        theirs = o[0, 0].numpy().astype(np.float64)
        for b, expect in ((1, True), (8, False)):
            ours = _ours_titans_rule(**inputs, chunk_size=b)
            name = f"deltanet, our b={b} vs fla's exact delta rule"
            rows.append(_row(name, "fla delta_rule_recurrence", ours, theirs, expect))
    return rows


def format_cross_check(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| case | reference | max abs error | max abs output | tolerance | equal? | expected |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['reference']} | {r['max_abs_error']:.2e} | "
            f"{r['max_abs_output']:.2f} | {r['tolerance']:.0e} | {'yes' if r['agree'] else 'no'}"
            f" | {'equal' if r['expect_equal'] else 'differ'} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Items 1 and 3: timing, one fresh subprocess per measurement.


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """One matched layer configuration of item 1."""

    dim: int
    heads: int
    chunk: int
    T: int

    @property
    def label(self) -> str:
        return f"dim {self.dim}, {self.heads} head{'s' if self.heads > 1 else ''}, chunk {self.chunk}, T {self.T}"


# What each row of item 1 runs. "ours-*" are `atlas_eqx.presets` layers (JAX); "peer*" are
# titans-pytorch `NeuralMemory` (torch) with its defaults (MemoryMLP depth 2, expansion 4,
# ResidualNorm, momentum, pre-RMSNorm) and `batch_size` None or equal to the chunk.
LAYER_IMPLEMENTATIONS: dict[str, dict[str, Any]] = {
    "ours titans": dict(framework="jax", preset="titans", options={}),
    "titans-pytorch": dict(framework="torch", batch_size=None),
    "titans-pytorch batch_size=chunk": dict(framework="torch", batch_size="chunk"),
    "ours atlas": dict(framework="jax", preset="atlas", options={"window": 4}),
    "ours atlas muon_per_chunk": dict(
        framework="jax", preset="atlas", options={"window": 4, "muon_per_chunk": True}
    ),
}
# Where the time of our layers goes (run with `profile=True`): the memory scan alone, and
# atlas without the Newton-Schulz iterations (`ns_steps=0` keeps only the normalisation).
PROFILE_IMPLEMENTATIONS: dict[str, dict[str, Any]] = {
    "ours titans: memory scan only": dict(
        framework="jax", preset="titans", options={}, part="scan"
    ),
    "ours atlas: memory scan only": dict(
        framework="jax", preset="atlas", options={"window": 4}, part="scan"
    ),
    "ours atlas ns_steps=0": dict(
        framework="jax", preset="atlas", options={"window": 4, "ns_steps": 0}
    ),
    "ours atlas muon_per_chunk: memory scan only": dict(
        framework="jax",
        preset="atlas",
        options={"window": 4, "muon_per_chunk": True},
        part="scan",
    ),
}
DEFAULT_LAYER_CONFIGS = (LayerConfig(64, 1, 16, 1024), LayerConfig(128, 2, 64, 2048))
QUICK_LAYER_CONFIGS = (LayerConfig(16, 1, 8, 64), LayerConfig(32, 2, 16, 128))
# Item 3: name -> (preset, overrides). Window c = 4 for atlas (`layout_options`).
LM_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "transformer": ("transformer", {}),
    "gated_deltanet": ("gated_deltanet", {}),
    "titans": ("titans", {}),
    "atlas muon_per_chunk": ("atlas", {"muon_per_chunk": True}),
}


@dataclasses.dataclass(frozen=True)
class PeersBenchConfig:
    layer_configs: tuple[LayerConfig, ...] = DEFAULT_LAYER_CONFIGS
    implementations: tuple[str, ...] = tuple(LAYER_IMPLEMENTATIONS)
    batch: int = 2
    repeats: int = 5
    rounds: int = 1  # item 1 repeated this many times, interleaved; the median round is kept
    threads: int = 2
    lm_lengths: tuple[int, ...] = (512, 2048, 8192)
    lm_presets: tuple[str, ...] = tuple(LM_PRESETS)
    # The default leaves out the atlas scan-only rows: each costs as much as the atlas row.
    profile: tuple[str, ...] = ("ours titans: memory scan only", "ours atlas ns_steps=0")
    lm_d_model: int = 128
    lm_heads: int = 2
    lm_layers: int = 2
    lm_chunk: int = 64
    lm_vocab: int = 256
    lm_repeats: int = 3
    budget_s: float = 30.0  # stop repeating a timed call after this many seconds
    timeout_s: float = 1200.0
    out_dir: str = "experiments/results/bench_peers"
    seed: int = 0


QUICK_CONFIG = PeersBenchConfig(
    layer_configs=QUICK_LAYER_CONFIGS,
    repeats=2,
    lm_lengths=(64, 128),
    lm_d_model=32,
    lm_chunk=16,
    lm_repeats=1,
    budget_s=5.0,
    profile=("ours titans: memory scan only",),
    out_dir="experiments/results/bench_peers/quick",
)


def _rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    """This process's peak resident memory, `VmHWM` of `/proc/self/status`, in MiB (see the
    module docstring for why not `ru_maxrss`); `ru_maxrss` where there is no `/proc`."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _time_calls(
    fn: Callable[[], Any], repeats: int, budget_s: float = float("inf")
) -> tuple[float, float, int]:
    """One warm-up call, then up to `repeats` timed calls (fewer once `budget_s` seconds of
    timed calls are spent, at least one). Returns (warm-up seconds, median, timed calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), len(times)


def _measure_jax_layer(spec: dict[str, Any]) -> dict[str, Any]:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import atlas_eqx as ae

    from ._scan import _peak_bytes

    rss_imports = _rss_mib()
    key = jax.random.key(spec["seed"])
    factory = getattr(ae.presets, spec["preset"])
    layer = factory(
        spec["dim"], spec["heads"], key=key, chunk_size=spec["chunk"], **spec["options"]
    )
    x = jax.random.normal(jax.random.fold_in(key, 1), (spec["batch"], spec["T"], spec["dim"]))
    if spec.get("part", "layer") == "scan":
        # Only the memory: `run_memory` on precomputed per-head inputs; the backward reaches
        # the layer's memory parameters and the inputs (q, k, v and the gates).
        x = jax.vmap(layer.memory_inputs)(x)
        apply: Callable = lambda m, i: jax.vmap(lambda one: m.run_memory(one)[0])(i)
        backward = eqx.filter_jit(eqx.filter_grad(lambda mi, _: jnp.mean(apply(mi[0], mi[1]) ** 2)))
        layer = (layer, x)  # the backward differentiates both
        forward = eqx.filter_jit(lambda mi, _: apply(mi[0], mi[1]))
    else:
        forward = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
        backward = eqx.filter_jit(eqx.filter_grad(lambda m, x: jnp.mean(jax.vmap(m)(x) ** 2)))
    run_f = lambda: jax.block_until_ready(forward(layer, x))
    run_b = lambda: jax.block_until_ready(backward(layer, x))
    first_f, fwd, n_f = _time_calls(run_f, spec["repeats"], spec["budget_s"])
    first_b, fwdbwd, n_b = _time_calls(run_b, spec["repeats"], spec["budget_s"])
    finite = bool(jnp.all(jnp.isfinite(forward(layer, x))))
    xla = _peak_bytes(backward, (layer, x))
    return dict(
        rss_imports_mib=rss_imports,
        first_forward_s=first_f,
        forward_s=fwd,
        first_backward_s=first_b,
        backward_s=fwdbwd,
        repeats_used=f"{n_f}/{n_b}",
        xla_backward_mib=None if xla is None else xla / 2**20,
        finite=finite,
    )


def _measure_torch_layer(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    torch, _ = require_peers()
    from titans_pytorch import NeuralMemory  # pyright: ignore[reportMissingImports]

    torch.set_num_threads(threads)
    rss_imports = _rss_mib()
    torch.manual_seed(spec["seed"])
    batch_size = spec["chunk"] if spec["batch_size"] == "chunk" else spec["batch_size"]
    memory = NeuralMemory(
        spec["dim"],
        chunk_size=spec["chunk"],
        heads=spec["heads"],
        dim_head=spec["dim"] // spec["heads"],
        batch_size=batch_size,
    )
    x = torch.randn(spec["batch"], spec["T"], spec["dim"])

    def run_f():
        with torch.no_grad():
            return memory(x)[0]

    def run_b():
        memory.zero_grad(set_to_none=True)
        y, _ = memory(x)
        y.pow(2).mean().backward()

    first_f, fwd, n_f = _time_calls(run_f, spec["repeats"], spec["budget_s"])
    first_b, fwdbwd, n_b = _time_calls(run_b, spec["repeats"], spec["budget_s"])
    return dict(
        rss_imports_mib=rss_imports,
        first_forward_s=first_f,
        forward_s=fwd,
        first_backward_s=first_b,
        backward_s=fwdbwd,
        repeats_used=f"{n_f}/{n_b}",
        xla_backward_mib=None,
        finite=bool(torch.isfinite(run_f()).all()),
    )


def _measure_lm_step(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    import numpy as np

    import atlas_eqx as ae

    from ..training._recall import layout_options
    from ..training._train import make_optimizer, make_train_step, OptimConfig

    rss_imports = _rss_mib()
    key = jax.random.key(spec["seed"])
    preset = spec["preset"]
    options = {**layout_options(preset, spec["chunk"], 4), **spec["options"]}
    model = ae.LanguageModel(
        spec["vocab"],
        spec["d_model"],
        spec["n_layers"],
        spec["heads"],
        key=key,
        mixer=preset,
        mixer_options=options,
    )
    optim = OptimConfig()
    optimizer = make_optimizer(optim, 1000)
    import equinox as eqx

    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(optim, 1000)
    rng = np.random.default_rng(spec["seed"])
    tokens = rng.integers(0, spec["vocab"], size=(spec["batch"], spec["T"] + 1))
    inputs, targets = jax.numpy.asarray(tokens[:, :-1]), jax.numpy.asarray(tokens[:, 1:])
    state: dict[str, Any] = dict(model=model, opt=opt_state, loss=None)

    def run():
        m, o, metrics = step(state["model"], state["opt"], inputs, targets)
        jax.block_until_ready(metrics["loss"])
        state["model"], state["opt"], state["loss"] = m, o, float(metrics["loss"])

    first, median, n = _time_calls(run, spec["repeats"], spec["budget_s"])
    return dict(
        rss_imports_mib=rss_imports,
        first_backward_s=first,
        backward_s=median,
        repeats_used=str(n),
        finite=bool(np.isfinite(state["loss"])),
    )


def _child_main() -> None:
    """Entry point of one measurement subprocess: the spec is JSON in argv[1]; the result is
    printed as one JSON line prefixed by `RESULT `."""
    spec = json.loads(sys.argv[1])
    os.sched_setaffinity(0, spec["cpus"])  # before jax or torch start their thread pools
    if spec["kind"] == "stream":
        from ._stream import measure_stream

        result = measure_stream(spec)
    elif spec["framework"] == "torch":
        result = _measure_torch_layer(spec, spec["threads"])
    elif spec["kind"] == "lm":
        result = _measure_lm_step(spec)
    else:
        result = _measure_jax_layer(spec)
    result["peak_rss_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def _child_environment(threads: int) -> dict[str, str]:
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _pinned_cpus(threads: int) -> list[int]:
    return sorted(os.sched_getaffinity(0))[:threads]


def run_child(spec: dict[str, Any], threads: int, timeout_s: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter pinned to `threads` CPUs."""
    cpus = _pinned_cpus(threads)
    code = "from experiments.bench._peers import _child_main; _child_main()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, json.dumps({**spec, "threads": threads, "cpus": cpus})],
            env=_child_environment(threads),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout_s:.0f} s")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return dict(error=f"exit {done.returncode}: " + " | ".join(tail))


def _layer_spec(name: str, layer: LayerConfig, config: PeersBenchConfig) -> dict[str, Any]:
    spec = dict({**LAYER_IMPLEMENTATIONS, **PROFILE_IMPLEMENTATIONS}[name])
    spec.update(
        kind="layer",
        dim=layer.dim,
        heads=layer.heads,
        chunk=layer.chunk,
        T=layer.T,
        batch=config.batch,
        repeats=config.repeats,
        budget_s=config.budget_s,
        seed=config.seed,
    )
    return spec


def _lm_spec(name: str, T: int, config: PeersBenchConfig) -> dict[str, Any]:
    preset, options = LM_PRESETS[name]
    return dict(
        kind="lm",
        framework="jax",
        preset=preset,
        options=options,
        T=T,
        batch=config.batch,
        d_model=config.lm_d_model,
        heads=config.lm_heads,
        n_layers=config.lm_layers,
        chunk=config.lm_chunk,
        vocab=config.lm_vocab,
        repeats=config.lm_repeats,
        budget_s=config.budget_s,
        seed=config.seed,
    )


def _tokens_per_s(result: dict[str, Any], key: str, tokens: int) -> float | None:
    seconds = result.get(key)
    return None if seconds is None else tokens / seconds


def run_layer_benchmark(
    config: PeersBenchConfig, implementations: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Item 1: every implementation at every matched configuration, one subprocess each;
    `config.rounds` times over, interleaved (round by round), keeping per row the round with
    the median forward+backward time (the faster of the two middle ones for an even count)
    and the range of tokens/s over the rounds."""
    names = config.implementations if implementations is None else implementations
    known = {**LAYER_IMPLEMENTATIONS, **PROFILE_IMPLEMENTATIONS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"bench peers: unknown implementation(s) {unknown}; choose from {list(known)}"
        )
    measured: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_index in range(config.rounds):
        for layer in config.layer_configs:
            for name in names:
                spec = _layer_spec(name, layer, config)
                if spec["framework"] == "torch":
                    require_peers()
                result = run_child(spec, config.threads, config.timeout_s)
                tokens = config.batch * layer.T
                row = dict(
                    config=layer.label,
                    implementation=name,
                    forward_tok_s=_tokens_per_s(result, "forward_s", tokens),
                    backward_tok_s=_tokens_per_s(result, "backward_s", tokens),
                    **result,
                )
                measured.setdefault((layer.label, name), []).append(row)
                prefix = f"[round {round_index + 1}/{config.rounds}] " if config.rounds > 1 else ""
                print(prefix + _format_layer_line(row), flush=True)
    return [_median_round(rounds) for rounds in measured.values()]


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in rounds if "error" not in r]
    if not good:
        return rounds[0]
    good.sort(key=lambda r: r["backward_s"])
    row = dict(good[(len(good) - 1) // 2])
    row["rounds"] = len(good)
    for key in ("forward_tok_s", "backward_tok_s"):
        values = [r[key] for r in good]
        row[key.replace("tok_s", "range")] = (min(values), max(values))
    return row


def run_lm_benchmark(config: PeersBenchConfig) -> list[dict[str, Any]]:
    """Item 3: one training step (forward, backward, AdamW) per preset and length."""
    rows = []
    for T in config.lm_lengths:
        for name in config.lm_presets:
            result = run_child(_lm_spec(name, T, config), config.threads, config.timeout_s)
            row = dict(
                T=T,
                preset=name,
                step_tok_s=_tokens_per_s(result, "backward_s", config.batch * T),
                **result,
            )
            rows.append(row)
            print(_format_lm_line(row), flush=True)
    return rows


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _format_layer_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['config']:38s} {row['implementation']:34s} ERROR {row['error']}"
    return (
        f"{row['config']:38s} {row['implementation']:34s} fwd {_fmt(row['forward_tok_s']):>8s}"
        f" tok/s  f+b {_fmt(row['backward_tok_s']):>8s} tok/s  peak RSS "
        f"{row['peak_rss_mib']:.0f} MiB"
    )


def _format_lm_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"LM step T={row['T']:<6d} {row['preset']:24s} ERROR {row['error']}"
    return (
        f"LM step T={row['T']:<6d} {row['preset']:24s} {_fmt(row['step_tok_s']):>8s} tok/s  "
        f"peak RSS {row['peak_rss_mib']:.0f} MiB"
    )


DIFFERENCES = """\
Differences between the matched layers that could not be removed (titans-pytorch 0.5.5
`NeuralMemory` with its defaults against our `titans` preset):

1. **Gradient anchor.** titans-pytorch's default `batch_size=None` takes every surprise
   gradient of the sequence at the sequence-start weights (the update is then linear in W);
   ours takes them at the weights after the previous chunk (b = chunk). The
   `batch_size=chunk` row has our anchors (the cross-check shows the rules are then equal at
   `chunk_size=1`).
2. **Read granularity.** titans-pytorch reads a chunk with the weights after the previous
   chunk (the last token of a chunk reads its own chunk's update); ours reads every token
   after its own write, $y_t = M(q_t; W_t)$, through the dual form inside the chunk.
3. **Gates.** Theirs: $\\eta$ per token, momentum and decay per chunk (from the chunk's mean
   input). Ours: all three per token and head.
4. **Momentum form.** Theirs is Titans' $S_t = \\theta_tS_{t-1} - \\eta_t\\nabla_t$,
   $W_t = (1 - a_t)W_{t-1} + S_t$; ours is ATLAS's $S_t = \\theta_tS_{t-1} + \\nabla_t$,
   $W_t = \\alpha_tW_{t-1} - \\eta_tS_t$ (equal iff $\\eta$ is constant, I-15; the
   cross-check shows both).
5. **Memory.** Theirs: `MemoryMLP` (depth 2, hidden 4d, exact GELU, no bias) inside
   `ResidualNorm` (LayerNorm with a learned gain on the MLP output, plus the residual).
   Ours: $x + W_1\\mathrm{GELU}(W_2x)$ (tanh-approximate GELU), no LayerNorm.
6. **Around the memory.** Theirs: input RMSNorm, linear q/k/v, no convolution, no
   activation, no q/k normalisation; for more than one head a sigmoid retrieve gate and a
   linear head merge, for one head no output projection. Ours: q/k/v projections, causal
   depthwise convolution (4 taps), SiLU, $\\ell_2$-normalised q and k, per-head RMSNorm,
   SiLU output gate and an output projection (also for one head).
7. **Loss scale.** Theirs is the mean over d of the squared error, $2/d$ times our
   $\\tfrac12\\|\\cdot\\|^2$; it only rescales $\\eta$.
8. **Execution.** Ours is one XLA program per call (`jax.jit`); theirs is eager PyTorch
   (`torch.func.vmap(grad)` per chunk, associative scans in Python; no `torch.compile`),
   the forward under `torch.no_grad()`.
9. **atlas** (beside, not matched: the peer has no Omega rule, polynomial map or Muon on the
   momentum): at head dimension 64 the preset uses the element-wise degree-2 map
   $k + k^{\\odot 2}/2$ (the exact monomial map would have 2145 features), window c = 4
   with per-token gates $\\gamma$, Muon with 5 Newton-Schulz steps per token;
   `muon_per_chunk` applies Newton-Schulz once per chunk (an approximation).
"""


def _machine_line() -> str:
    import platform

    load = os.getloadavg()
    cpus = os.cpu_count()
    return (
        f"{platform.machine()}, {cpus} CPUs visible, each measurement pinned to "
        f"{len(_pinned_cpus(2))}; load average at start {load[0]:.2f}, {load[1]:.2f}, "
        f"{load[2]:.2f} (1, 5, 15 min; a shared machine); JAX persistent compilation cache "
        f"{'on' if os.environ.get('JAX_COMPILATION_CACHE_DIR') else 'off'} (first calls "
        f"{'may reuse cached programs' if os.environ.get('JAX_COMPILATION_CACHE_DIR') else 'include compilation'})"
    )


def _versions() -> str:
    import jax

    parts = [f"jax {jax.__version__}"]
    try:
        torch, titans = require_peers()
        from importlib.metadata import version

        parts += [f"torch {torch.__version__}", f"titans-pytorch {version('titans-pytorch')}"]
        try:
            parts.append(f"fla-core {version('fla-core')}")
        except Exception:
            pass
    except PeersMissing:
        pass
    return ", ".join(parts)


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _range(row: dict[str, Any]) -> str:
    low_high = row.get("backward_range")
    if not low_high or row.get("rounds", 1) < 2:
        return ""
    return f"{low_high[0]:.0f}-{low_high[1]:.0f} ({row['rounds']} rounds)"


def _rows_by_config(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The layer rows grouped as `{configuration: {implementation: row}}`, in order."""
    by_config: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_config.setdefault(r["config"], {})[r["implementation"]] = r
    return by_config


def format_layer_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| configuration | implementation | fwd tok/s | f+b tok/s | f+b ours/titans-pytorch | "
        "f+b ours/titans-pytorch bs=chunk | first fwd / f+b call s | peak RSS MiB | RSS after "
        "imports MiB | XLA f+b buffers MiB | timed calls fwd/f+b | f+b tok/s over rounds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_config = _rows_by_config(rows)
    for config, impls in by_config.items():
        peer = impls.get("titans-pytorch", {}).get("backward_tok_s")
        peer_b = impls.get("titans-pytorch batch_size=chunk", {}).get("backward_tok_s")
        for name, r in impls.items():
            if "error" in r:
                lines.append(f"| {config} | {name} | error: {r['error']} | | | | | | | | | |")
                continue
            ours = name.startswith("ours")
            xla = r.get("xla_backward_mib")
            lines.append(
                f"| {config} | {name} | {_fmt(r['forward_tok_s'])} | {_fmt(r['backward_tok_s'])}"
                f" | {_ratio(r['backward_tok_s'], peer) if ours else ''}"
                f" | {_ratio(r['backward_tok_s'], peer_b) if ours else ''}"
                f" | {r['first_forward_s']:.1f} / {r['first_backward_s']:.1f}"
                f" | {r['peak_rss_mib']:.0f} | {r['rss_imports_mib']:.0f}"
                f" | {_fmt(xla, '.1f')} | {r.get('repeats_used', '')} | {_range(r)} |"
            )
    return "\n".join(lines)


def format_forward_ratios(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| configuration | implementation | fwd ours/titans-pytorch | fwd ours/titans-pytorch "
        "bs=chunk |",
        "|---|---|---|---|",
    ]
    by_config = _rows_by_config(rows)
    for config, impls in by_config.items():
        peer = impls.get("titans-pytorch", {}).get("forward_tok_s")
        peer_b = impls.get("titans-pytorch batch_size=chunk", {}).get("forward_tok_s")
        for name, r in impls.items():
            if name.startswith("ours") and "error" not in r:
                lines.append(
                    f"| {config} | {name} | {_ratio(r['forward_tok_s'], peer)} | "
                    f"{_ratio(r['forward_tok_s'], peer_b)} |"
                )
    return "\n".join(lines)


def format_targets(rows: Sequence[dict[str, Any]], lm_rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| target | configuration | measured | met? |", "|---|---|---|---|"]
    by_config = _rows_by_config(rows)
    get = lambda impls, name, key: impls.get(name, {}).get(key)
    for config, impls in by_config.items():
        peer = get(impls, "titans-pytorch", "backward_tok_s")
        ours = get(impls, "ours titans", "backward_tok_s")
        peer_b = get(impls, "titans-pytorch batch_size=chunk", "backward_tok_s")
        if peer and ours:
            ratio = ours / peer
            lines.append(
                f"| titans f+b >= 2x titans-pytorch | {config} | {ratio:.2f}x | "
                f"{'yes' if ratio >= 2 else 'no'} |"
            )
        if peer_b and ours:
            lines.append(
                f"| (beside) titans f+b vs titans-pytorch batch_size=chunk | {config} | "
                f"{ours / peer_b:.2f}x | |"
            )
        for name in ("ours atlas", "ours atlas muon_per_chunk"):
            atlas = get(impls, name, "backward_tok_s")
            atlas_f = get(impls, name, "forward_tok_s")
            peer_f = get(impls, "titans-pytorch", "forward_tok_s")
            if peer and atlas and atlas_f and peer_f:
                met = atlas >= peer and atlas_f >= peer_f
                lines.append(
                    f"| {name.removeprefix('ours ')} (Muon) >= titans-pytorch (no Muon) | "
                    f"{config} | fwd {atlas_f / peer_f:.2f}x, f+b {atlas / peer:.2f}x | "
                    f"{'yes' if met else 'no'} |"
                )
    if lm_rows:
        T = max(r["T"] for r in lm_rows)
        at = {r["preset"]: r.get("step_tok_s") for r in lm_rows if r["T"] == T}
        attention = at.get("transformer")
        for name, value in at.items():
            if name != "transformer" and value and attention:
                lines.append(
                    f"| recurrent LM step faster than attention at T = {T} | {name} | "
                    f"{value / attention:.2f}x | {'yes' if value > attention else 'no'} |"
                )
    return "\n".join(lines)


def _profile_base(name: str) -> str:
    return name.split(":")[0].replace(" ns_steps=0", "")


def format_profile_table(rows: Sequence[dict[str, Any]], profile: Sequence[dict[str, Any]]) -> str:
    """Each profile row's time as a share of the full layer it is a part or variant of."""
    lines = [
        "| configuration | measured | fwd ms | f+b ms | fwd share of the layer | f+b share |",
        "|---|---|---|---|---|---|",
    ]
    full = {(r["config"], r["implementation"]): r for r in rows if "error" not in r}
    ms = lambda r, key: None if r.get(key) is None else 1e3 * r[key]
    for r in profile:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['implementation']} | error: {r['error']} | | | |")
            continue
        layer = full.get((r["config"], _profile_base(r["implementation"])))

        def share(key: str, r: dict[str, Any] = r, layer: dict[str, Any] | None = layer) -> str:
            if layer is None or not layer.get(key) or r.get(key) is None:
                return "n/a"
            return f"{r[key] / layer[key]:.0%}"

        lines.append(
            f"| {r['config']} | {r['implementation']} | {_fmt(ms(r, 'forward_s'), '.1f')} | "
            f"{_fmt(ms(r, 'backward_s'), '.1f')} | {share('forward_s')} | {share('backward_s')} |"
        )
    for (config, name), layer in full.items():
        if any(
            _profile_base(p["implementation"]) == name and p["config"] == config for p in profile
        ):
            lines.append(
                f"| {config} | {name} (the full layer) | {_fmt(ms(layer, 'forward_s'), '.1f')} | "
                f"{_fmt(ms(layer, 'backward_s'), '.1f')} | 100% | 100% |"
            )
    return "\n".join(lines)


def format_lm_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| T | preset | train step tok/s | ours/transformer | first step s | peak RSS MiB | "
        "timed steps |",
        "|---|---|---|---|---|---|---|",
    ]
    attention = {r["T"]: r.get("step_tok_s") for r in rows if r["preset"] == "transformer"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['T']} | {r['preset']} | error: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['T']} | {r['preset']} | {_fmt(r['step_tok_s'])} | "
            f"{_ratio(r['step_tok_s'], attention.get(r['T']))} | {r['first_backward_s']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {r.get('repeats_used', '')} |"
        )
    return "\n".join(lines)


def plot_results(
    rows: Sequence[dict[str, Any]], lm_rows: Sequence[dict[str, Any]], path: pathlib.Path
) -> bool:
    """Forward+backward tokens/s per implementation and configuration (log scale), and the LM
    training step against T. Returns False if matplotlib is missing."""
    plt = pyplot_or_none()
    if plt is None:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    names = list(dict.fromkeys(r["implementation"] for r in rows))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        values = []
        for config in configs:
            match = [r for r in rows if r["config"] == config and r["implementation"] == name]
            values.append((match[0].get("backward_tok_s") or 0.0) if match else 0.0)
        left.bar([i + j * width for i in range(len(configs))], values, width, label=name)
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], configs, fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("forward+backward tokens/s")
    left.set_title("memory layers, batch 2, float32, 2 threads")
    left.legend(fontsize=7)
    left.grid(alpha=0.3, axis="y")
    for name in dict.fromkeys(r["preset"] for r in lm_rows):
        points = [(r["T"], r.get("step_tok_s")) for r in lm_rows if r["preset"] == name]
        points = [(t, v) for t, v in points if v]
        if points:
            right.plot(*zip(*points, strict=True), marker="o", label=name)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("sequence length T")
    right.set_ylabel("training-step tokens/s")
    right.set_title("language-model training step (ours)")
    if lm_rows:
        right.legend(fontsize=7)
    right.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path)
    return True


def run_peers_benchmark(
    config: PeersBenchConfig = PeersBenchConfig(),
    *,
    command: str = "atlas-eqx bench peers",
    layers: bool = True,
    lm: bool = True,
    stream: StreamBenchConfig | None = DEFAULT_STREAM_CONFIG,
) -> str:
    """Items 1 to 5: run everything, write `results.md` and `throughput.png` under
    `config.out_dir`, and return the markdown. `stream` (item 4, `None` skips it) writes its
    own `stream.md` and `stream.png` there (`experiments.bench._stream`). With `layers` and
    `lm` both off, `results.md` is left as it is (only the cross-check and the stream part
    run), so that rerunning the stream part alone does not blank the layer tables."""
    require_peers()
    machine = _machine_line()
    versions = _versions()
    print(f"{command}\n{machine}\n{versions}", flush=True)
    rows = run_layer_benchmark(config) if layers else []
    profile = run_layer_benchmark(config, config.profile) if layers and config.profile else []
    print("numerical cross-check ...", flush=True)
    checks = cross_check_numpy() + cross_check_peers()
    print(format_cross_check(checks), flush=True)
    lm_rows = run_lm_benchmark(config) if lm else []
    out = pathlib.Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stream_text = None
    if stream is not None:
        _, stream_text = write_stream_results(
            stream, out, command=command, machine=machine, versions=versions
        )
    if not (layers or lm):
        print(f"{out / 'results.md'} not rewritten: the layers and lm parts were skipped")
        return stream_text or ""
    plotted = plot_results(rows, lm_rows, out / "throughput.png")
    text = "\n\n".join(
        [
            "# Benchmarks against the peers (`atlas-eqx bench peers`)",
            f"```\n{command}\n```",
            f"Machine: {machine}. {_versions()}. float32, batch {config.batch}, "
            f"{config.threads} threads per framework, median of up to {config.repeats} timed "
            f"calls after one warm-up call (LM: {config.lm_repeats}; fewer once "
            f"{config.budget_s:.0f} s of timed calls are spent: the column 'timed calls' gives "
            "the count). Measured by the rules "
            "in the docstring of `experiments/bench/_peers.py`: one fresh subprocess per "
            "row; peak RSS is that process's `VmHWM` (imports, build, compilation, "
            "forward and forward+backward together), beside its resident memory after the "
            "imports; XLA f+b buffers is the compiled forward+backward's buffer assignment.",
            "## 1. Matched memory layers: ours against titans-pytorch `NeuralMemory`",
            format_layer_table(rows) if rows else "(not run)",
            "Forward ratios:",
            format_forward_ratios(rows) if rows else "(not run)",
            DIFFERENCES,
            "### Where our layers' time goes",
            "The memory scan alone (`run_memory` on precomputed q, k, v and gates; its "
            "backward reaches them and $W_0$) and atlas with `ns_steps=0` (Muon's "
            "normalisation without the five Newton-Schulz iterations), as a share of the "
            "full layer's median time in the table above (separate subprocesses, so shares "
            "carry the run-to-run noise of a shared machine).",
            format_profile_table(rows, profile) if profile else "(not run)",
            "## 2. Numerical cross-check where the definitions coincide",
            "titans-pytorch reduced to `chunk_size=1` (one head, no RMSNorms, no "
            "`ResidualNorm`; its `batch_size` = our `chunk_size`), float64, against our "
            '`omega_scan(method="chunked")` in float32 with the same projections, gates and '
            "initial memory; fla's `delta_rule_recurrence` (float32) against our `deltanet` "
            "rule (linear memory, $W_0 = 0$, GD, $\\alpha = 1$, c = 1). Rows marked "
            "'differ' differ by definition: Titans' momentum form with a per-token $\\eta$ "
            "(I-15), and our frozen-anchor chunks (b = 8) against fla's exact delta rule. "
            "No configuration makes titans-pytorch's own chunking (`chunk_size > 1`) equal "
            "ours: it reads at chunk granularity and shares momentum and decay per chunk.",
            format_cross_check(checks),
            "## 3. Language-model training step: recurrent presets against attention",
            f"`LanguageModel`, vocabulary {config.lm_vocab}, d_model {config.lm_d_model}, "
            f"{config.lm_layers} blocks, {config.lm_heads} heads, chunk {config.lm_chunk}, "
            f"batch {config.batch}; one jitted step = forward, backward and AdamW.",
            format_lm_table(lm_rows) if lm_rows else "(not run)",
            "## 4. Streaming inference (part `stream`)",
            "Tokens/s and resident memory of a memory-only atlas (and titans) scan streamed "
            "in fixed-size calls with the carried state, at T up to 1M tokens: "
            "[stream.md](stream.md), [stream.png](stream.png)"
            + ("" if stream is not None else " (not rerun in this run: `--skip stream`)")
            + ".",
            "## Targets",
            format_targets(rows, lm_rows),
            "![throughput](throughput.png)" if plotted else "(matplotlib missing: no plot)",
        ]
    )
    (out / "results.md").write_text(text + "\n")
    print(f"wrote {out / 'results.md'}" + (f" and {out / 'throughput.png'}" if plotted else ""))
    return text

r"""Item 2 of `bench peers`: the numerical cross-check where the definitions coincide.

NumPy references of titans-pytorch reduced to `chunk_size=1` and of the delta rule, our
`omega_scan` on the same inputs, and (when installed) titans-pytorch and fla themselves.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._peer_packages import load_fla_naive_delta_rule, require_peers


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

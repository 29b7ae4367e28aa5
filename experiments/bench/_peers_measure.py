"""Items 1 and 3 of `bench peers` inside one measurement subprocess: time a JAX or torch
layer's forward and forward+backward, or one language-model training step."""

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ._peer_packages import require_peers
from ._subprocess import _rss_mib


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

    from ._flops import count_flops
    from ._op_profile import time_by_kind
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
    forward_count, backward_count = (count_flops(f, layer, x) for f in (forward, backward))
    kinds = {"backward_time_by_kind": time_by_kind(run_b)} if spec.get("time_by_kind") else {}
    tokens = spec["batch"] * spec["T"]
    return dict(
        forward_flops_per_token=forward_count.total / tokens,
        backward_flops_per_token=backward_count.total / tokens,
        forward_matrix_flops_per_token=forward_count.matrix_flops / tokens,
        backward_matrix_flops_per_token=backward_count.matrix_flops / tokens,
        rss_imports_mib=rss_imports,
        first_forward_s=first_f,
        forward_s=fwd,
        first_backward_s=first_b,
        backward_s=fwdbwd,
        repeats_used=f"{n_f}/{n_b}",
        xla_backward_mib=None if xla is None else xla / 2**20,
        finite=finite,
        **kinds,
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
    tokens = spec["batch"] * spec["T"]
    return dict(
        # Counted with the forward's autograd on: the peer's forward runs the same operations
        # (its per-token surprise gradients are part of the forward) and the counter's module
        # hooks fail under `torch.no_grad()`.
        forward_matrix_flops_per_token=torch_flops(lambda: memory(x)) / tokens,
        backward_matrix_flops_per_token=torch_flops(run_b) / tokens,
        rss_imports_mib=rss_imports,
        first_forward_s=first_f,
        forward_s=fwd,
        first_backward_s=first_b,
        backward_s=fwdbwd,
        repeats_used=f"{n_f}/{n_b}",
        xla_backward_mib=None,
        finite=bool(torch.isfinite(run_f()).all()),
    )


def torch_flops(call: Callable[[], Any]) -> int:
    """The FLOPs of one `call()` in torch, by `torch.utils.flop_counter.FlopCounterMode`: matrix
    products (mm, bmm, addmm, convolutions, attention) at 2 per multiply-add, the convention of
    `experiments.bench._flops` on the JAX side; torch counts no element-wise work, so a torch
    count is a lower bound beside a JAX one (which counts 1 per element-wise output)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def measure_gemm(spec: dict[str, Any]) -> dict[str, Any]:
    """The machine's float32 GEMM rate in this round: `timed_gemm` (a `gemm_size`^3 matmul,
    $2n^3$ FLOPs), median of `repeats` calls after a warm-up."""
    import jax

    from ._scan import timed_gemm

    matmul, args = timed_gemm(spec["gemm_size"], jax.random.key(spec["seed"]))
    _, seconds, _ = _time_calls(lambda: jax.block_until_ready(matmul(*args)), spec["repeats"])
    return dict(gemm_flops_per_s=2 * spec["gemm_size"] ** 3 / seconds)


def _measure_lm_step(spec: dict[str, Any]) -> dict[str, Any]:
    import jax

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

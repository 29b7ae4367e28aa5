"""Items 1, 3 and 5 of `bench peers`: the tables of `results.md`, the targets, the machine and
version lines, and `throughput.png`."""

import os
import pathlib
from collections.abc import Sequence
from typing import Any

from .._plot import pyplot_or_none, save_figure
from ._peer_packages import PeersMissing, require_peers
from ._subprocess import _pinned_cpus


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


def format_flop_table(rows: Sequence[dict[str, Any]]) -> str:
    """FLOPs per token of every row, the rate each reached against the GEMM timed in its round,
    and for our rows the forward+backward ratio to titans-pytorch that running at the GEMM's
    rate would give (the ceiling of the ratio at that FLOP count)."""
    lines = [
        "| configuration | implementation | fwd kFLOP/token (matrix products) | f+b kFLOP/token "
        "(matrix products) | f+b matrix FLOPs ours/titans-pytorch | f+b matrix GFLOP/s | of "
        "the GEMM | f+b ours/titans-pytorch if ours ran at the GEMM's rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    kilo = lambda total, matrix: f"{_fmt(total and total / 1e3)} ({_fmt(matrix and matrix / 1e3)})"
    for config, impls in _rows_by_config(rows).items():
        peer = impls.get("titans-pytorch", {})
        peer_flops = peer.get("backward_matrix_flops_per_token")
        for name, r in impls.items():
            flops = r.get("backward_matrix_flops_per_token")
            if "error" in r or flops is None:
                continue
            ours = name.startswith("ours")
            rate = flops * r["backward_tok_s"]
            gemm = r.get("gemm_flops_per_s")
            ceiling = (
                gemm / flops / peer["backward_tok_s"]
                if ours and gemm and peer.get("backward_tok_s")
                else None
            )
            lines.append(
                f"| {config} | {name} "
                f"| {kilo(r.get('forward_flops_per_token'), r['forward_matrix_flops_per_token'])} "
                f"| {kilo(r.get('backward_flops_per_token'), flops)} "
                f"| {_ratio(flops, peer_flops) if ours else ''} | {rate / 1e9:.1f} "
                f"| {_fmt(gemm and rate / gemm * 100, '.0f')}% | {_fmt(ceiling, '.2f')} |"
            )
    gemms = [r["gemm_flops_per_s"] for r in rows if r.get("gemm_flops_per_s")]
    if gemms:
        lines.append(
            f"\nThe GEMM ran at {min(gemms) / 1e9:.0f}-{max(gemms) / 1e9:.0f} GFLOP/s in the "
            "rounds kept."
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


def format_time_by_kind(rows: Sequence[dict[str, Any]]) -> str:
    """The forward+backward's operation time by kind, for the rows that traced it."""
    from ._op_profile import KINDS

    lines = [
        "| configuration | implementation | " + " | ".join(KINDS) + " |",
        "|---|---|" + "---|" * len(KINDS),
    ]
    for r in rows:
        shares = r.get("backward_time_by_kind")
        if shares:
            cells = " | ".join(f"{shares[kind]:.0%}" for kind in KINDS)
            lines.append(f"| {r['config']} | {r['implementation']} | {cells} |")
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

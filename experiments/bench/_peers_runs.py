"""Items 1 and 3 of `bench peers` in the parent process: the configurations, one measurement
spec per row, each run in its own pinned subprocess (`run_child`), and rounds reduced to the
median."""

import dataclasses
from collections.abc import Sequence
from typing import Any

from ._peer_packages import require_peers
from ._peers_report import _format_layer_line, _format_lm_line
from ._subprocess import run_child


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
# `time_by_kind`: also trace the forward+backward and split its time by kind of XLA operation
# (`experiments.bench._op_profile`; left out of the rows whose calls take minutes).
LAYER_IMPLEMENTATIONS: dict[str, dict[str, Any]] = {
    "ours titans": dict(framework="jax", preset="titans", options={}, time_by_kind=True),
    "titans-pytorch": dict(framework="torch", batch_size=None),
    "titans-pytorch batch_size=chunk": dict(framework="torch", batch_size="chunk"),
    "ours atlas": dict(framework="jax", preset="atlas", options={"window": 4}),
    "ours atlas muon_per_chunk": dict(
        framework="jax",
        preset="atlas",
        options={"window": 4, "muon_per_chunk": True},
        time_by_kind=True,
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
    gemm_size: int = 1024  # the float32 GEMM timed at the start of each round of item 1
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


def _gemm_spec(config: PeersBenchConfig) -> dict[str, Any]:
    return dict(
        kind="gemm",
        framework="jax",
        gemm_size=config.gemm_size,
        repeats=config.repeats,
        seed=config.seed,
    )


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
        gemm = run_child(_gemm_spec(config), config.threads, config.timeout_s)
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
                    gemm_flops_per_s=gemm.get("gemm_flops_per_s"),
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

"""Parameter counts of every preset's language model at the paper's scales, with no memory allocated.

Each model is built under `eqx.filter_eval_shape`, so its leaves are `jax.ShapeDtypeStruct`s and
counting a 760M model costs only the tracing of its constructor.
"""

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._layer import MemoryLayer
from ._model import LanguageModel, MixerFactory, preset_names


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One row of ATLAS Table 7 (digest 7.3): the macro sizes of a paper model."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    nominal_parameters: float


PAPER_CONFIGS: Mapping[str, ModelConfig] = {
    config.name: config
    for config in (
        ModelConfig("170M", 12, 768, 16, 170e6),
        ModelConfig("340M", 24, 1024, 16, 340e6),
        ModelConfig("760M", 24, 1536, 16, 760e6),
        ModelConfig("1.3B", 18, 2048, 8, 1.3e9),
    )
}
"""ATLAS Table 7: blocks, width and heads of each size."""

PAPER_VOCAB_SIZE = 32_000
""""T5 tokenizer, vocabulary 32K" (ATLAS App. E; digest 7.3). The T5 tokenizer has 32,100
entries with its 100 sentinels; the Llama-2 tokenizer of the baselines has 32,000."""

REPORTED_SIZES: Mapping[str, Mapping[str, str]] = {
    "transformer": {"340M": "ATLAS Table 8", "760M": "ATLAS Table 2", "1.3B": "ATLAS Table 2"},
    "deltanet": {"340M": "ATLAS Table 8", "760M": "ATLAS Table 2", "1.3B": "ATLAS Table 2"},
    "gated_deltanet": {
        "340M": "ATLAS Table 8",
        "760M": "ATLAS Table 2",
        "1.3B": "ATLAS Table 2",
    },
    "titans": {"340M": "Titans v1 Table 1", "760M": "ATLAS Table 2", "1.3B": "ATLAS Table 2"},
    "omeganet": {"340M": "ATLAS Table 8", "760M": "ATLAS Table 2", "1.3B": "ATLAS Table 2"},
    "atlas": {"340M": "ATLAS Table 8", "760M": "ATLAS Table 2", "1.3B": "ATLAS Table 2"},
    "atlas_pp": {"760M": "ATLAS Table 2", "1.3B": "ATLAS Table 2"},
    "deep_transformer": {"760M": "ATLAS Table 2", "1.3B": "ATLAS Table 2"},
    "dot": {"760M": "ATLAS Table 2", "1.3B": "ATLAS Table 2"},
    "swdt": {"340M": "ATLAS Table 8", "760M": "ATLAS Table 2"},
    "dla": {"340M": "ATLAS Table 8", "760M": "ATLAS Table 2"},
    "mag": {"760M": "ATLAS Table 2"},
    "mal": {"760M": "ATLAS Table 2"},
}
"""Where the paper reports each preset at each size (digest 8.1, 8.6, 8.8). `linear_attention`,
`swla` and `swa` have no row in any table; Titans at 340M is reported by Titans v1 only."""


@dataclasses.dataclass(frozen=True)
class ParameterCountRow:
    """One preset at one configuration: its count, and the paper's nominal size where reported."""

    preset: str
    config: str
    parameters: int
    mixer_parameters_per_block: int
    reported: str | None
    relative_difference: float | None
    source: str | None


def _is_inexact_leaf(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return hasattr(leaf, "shape") and dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _size(tree: PyTree) -> int:
    return sum(int(leaf.size) for leaf in jax.tree.leaves(tree) if _is_inexact_leaf(leaf))


def _frozen_initial_memories(tree: PyTree) -> list[PyTree]:
    """The $W_0$ of memory layers built with `learn_initial_memory=False` (held as arrays, but
    behind `jax.lax.stop_gradient`: DeltaNet's fixed $W_0 = 0$, for instance)."""
    layers = jax.tree.leaves(tree, is_leaf=lambda node: isinstance(node, MemoryLayer))
    return [
        layer.memory
        for layer in layers
        if isinstance(layer, MemoryLayer)
        and layer.memory is not None
        and not layer.config.learn_initial_memory
    ]


def count_parameters(tree: PyTree, *, include_frozen: bool = False) -> int:
    """The number of trained scalars: the total size of the floating-point array leaves.

    Works on real arrays and on the `jax.ShapeDtypeStruct`s of `eqx.filter_eval_shape`.
    Learned initial memory states ($W_0$ per head, `learn_initial_memory=True`, the default of
    the deep-memory presets) and persistent tokens are parameters and count. A fixed $W_0$
    (`learn_initial_memory=False`: DeltaNet, Gated DeltaNet, linear attention, SWLA) is a
    constant, not a parameter, and counts only with `include_frozen=True`. Integer leaves
    and static fields never count.
    """
    total = _size(tree)
    if not include_frozen:
        total -= sum(_size(memory) for memory in _frozen_initial_memories(tree))
    return total


def abstract_language_model(
    mixer: str | MixerFactory,
    config: ModelConfig | str,
    *,
    vocab_size: int = PAPER_VOCAB_SIZE,
    **model_options: Any,
) -> LanguageModel:
    """`LanguageModel` at a paper configuration, built by `eqx.filter_eval_shape`: its array
    leaves are `jax.ShapeDtypeStruct`s and no memory is allocated."""
    if isinstance(config, str):
        if config not in PAPER_CONFIGS:
            raise ValueError(
                f"abstract_language_model: unknown `config` {config!r}; expected one of "
                f"{', '.join(PAPER_CONFIGS)} or a ModelConfig"
            )
        config = PAPER_CONFIGS[config]
    return eqx.filter_eval_shape(
        lambda key: LanguageModel(
            vocab_size,
            config.d_model,
            config.n_layers,
            config.n_heads,
            key=key,
            mixer=mixer,
            **model_options,
        ),
        jax.random.PRNGKey(0),
    )


def parameter_counts(
    presets: Iterable[str] | None = None,
    configs: Sequence[str] = ("340M", "760M"),
    *,
    vocab_size: int = PAPER_VOCAB_SIZE,
    tie_embeddings: bool = True,
    **model_options: Any,
) -> list[ParameterCountRow]:
    """Count every preset's `LanguageModel` at the paper's configurations (ATLAS Table 7).

    **Arguments:**

    - `presets`: preset names (default: all of `atlas_eqx.presets`).
    - `configs`: names of `PAPER_CONFIGS` (default 340M and 760M).
    - `vocab_size`, `tie_embeddings`, `model_options`: passed to `LanguageModel` (e.g.
      `mixer_options=...`, `mlp_multiple_of=256`).

    **Returns:** one row per preset and configuration, with the relative difference
    `(count - nominal) / nominal` where the paper reports that preset at that size.
    """
    names = preset_names() if presets is None else tuple(presets)
    for config in configs:
        if config not in PAPER_CONFIGS:
            raise ValueError(
                f"parameter_counts: unknown config {config!r}; expected one of "
                f"{', '.join(PAPER_CONFIGS)}"
            )
    rows = []
    for name in names:
        for config_name in configs:
            config = PAPER_CONFIGS[config_name]
            model = abstract_language_model(
                name,
                config,
                vocab_size=vocab_size,
                tie_embeddings=tie_embeddings,
                **model_options,
            )
            total = count_parameters(model)
            source = REPORTED_SIZES.get(name, {}).get(config_name)
            rows.append(
                ParameterCountRow(
                    preset=name,
                    config=config_name,
                    parameters=total,
                    mixer_parameters_per_block=count_parameters(model.blocks[0].mixer),
                    reported=config_name if source is not None else None,
                    relative_difference=(
                        None
                        if source is None
                        else (total - config.nominal_parameters) / config.nominal_parameters
                    ),
                    source=source,
                )
            )
    return rows


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def format_parameter_table(rows: Iterable[ParameterCountRow]) -> str:
    """A markdown table of `parameter_counts` rows; presets the paper does not report at a size
    say so in the last column."""
    lines = [
        "| preset | config | parameters | mixer / block | paper | rel. diff. | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reported = row.reported if row.reported is not None else "-"
        difference = (
            f"{row.relative_difference:+.1%}" if row.relative_difference is not None else "-"
        )
        source = row.source if row.source is not None else f"not reported at {row.config}"
        lines.append(
            f"| {row.preset} | {row.config} | {_millions(row.parameters)} | "
            f"{_millions(row.mixer_parameters_per_block)} | {reported} | {difference} | {source} |"
        )
    return "\n".join(lines)

"""`atlas-eqx bench flops` (issue 23): the FLOP counter against XLA's count and hand counts,
the split into parts, and the CLI's tables at a tiny size (speed is never a timed test)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import atlas_eqx as ae
from experiments.bench._flops import count_flops, PARTS
from experiments.bench._flops_bench import _layer_functions, FlopsBenchConfig, measure_size
from experiments.cli._main import main


def _xla_flops(function, *args) -> float:
    analysis = jax.jit(function).lower(*args).compile().cost_analysis()
    assert analysis is not None
    return analysis["flops"]


def test_matmul_is_2mnk_as_xla_counts_it():
    a, b = jnp.ones((24, 40)), jnp.ones((40, 56))
    assert count_flops(jnp.matmul, a, b).total == 2 * 24 * 40 * 56 == _xla_flops(jnp.matmul, a, b)


def test_scan_counts_its_body_length_times_as_xla_does_once_unrolled():
    def make(unroll):
        def f(x, w):
            body = lambda c, _: (0.5 * (c @ w) + x, None)
            return jax.lax.scan(body, x, None, length=10, unroll=unroll)[0]

        return f

    x, w = jnp.ones((32, 32)), jnp.ones((32, 32))
    ours = count_flops(make(False), x, w).total
    assert ours == 10 * (2 * 32**3 + 2 * 32 * 32)
    assert count_flops(make(True), x, w).total == ours
    assert _xla_flops(make(True), x, w) == pytest.approx(ours, rel=0.01)
    assert _xla_flops(make(False), x, w) < ours / 5  # XLA counts the rolled body once


def test_matrix_flops_are_the_products_alone_as_torch_counts_them():
    """`matrix_flops` leaves out the element-wise work, so it equals torch's `FlopCounterMode` on
    the same program (the comparison `bench peers` draws with titans-pytorch)."""
    f = lambda x, w: jnp.tanh(x @ w) @ w.T + 1.0
    x, w = jnp.ones((8, 16, 32)), jnp.ones((32, 48))
    count = count_flops(f, x, w)
    products = 2 * 2 * 8 * 16 * 32 * 48
    assert count.matrix_flops == products
    assert count.total == products + 8 * 16 * 32  # the + 1.0; tanh is a transcendental
    torch = pytest.importorskip("torch")
    from experiments.bench._peers_measure import torch_flops

    xt, wt = torch.ones(8, 16, 32), torch.ones(32, 48)
    assert torch_flops(lambda: torch.tanh(xt @ wt) @ wt.T + 1.0) == count.matrix_flops


def test_while_loop_is_an_error():
    f = lambda x: jax.lax.while_loop(lambda c: c[0] < 3.0, lambda c: c + 1.0, x)
    with pytest.raises(ValueError, match="while_loop"):
        count_flops(f, jnp.zeros(2))


@pytest.mark.parametrize(
    "preset, T, options, tolerance",
    [
        ("transformer", 64, {}, 0.1),
        # One token, so that the sequential scan has no loop. XLA's simplifier then also folds
        # away element-wise work on the convolution's zero history, which the jaxpr keeps.
        ("linear_attention", 1, dict(method="sequential"), 0.15),
    ],
)
def test_loop_free_layers_agree_with_xla(preset, T, options, tolerance):
    layer = getattr(ae.presets, preset)(64, 4, key=jax.random.key(0), **options)
    x = jax.random.normal(jax.random.key(1), (1, T, 64))
    arrays, static = eqx.partition((layer, x), eqx.is_array)
    for function in _layer_functions(layer, x):
        on_arrays = lambda a, f=function: f(eqx.combine(a, static))
        ours = count_flops(on_arrays, arrays)
        xla = _xla_flops(on_arrays, arrays)
        assert ours.matrix_flops <= xla  # XLA drops element-wise work at most, no product
        assert ours.total == pytest.approx(xla, rel=tolerance)


def _counts(preset, d_model, n_heads, T, **options):
    layer = getattr(ae.presets, preset)(d_model, n_heads, key=jax.random.key(0), **options)
    x = jax.random.normal(jax.random.key(1), (1, T, d_model))
    forward, backward = _layer_functions(layer, x)
    return layer, count_flops(forward, (layer, x)), count_flops(backward, (layer, x))


def test_newton_schulz_part_is_the_hand_count():
    T, d_model, H, b = 32, 16, 2, 4
    layer, forward, _ = _counts("atlas", d_model, H, T, chunk_size=b)
    config = layer.config
    matrices = [w for w in jax.tree.leaves(layer.memory) if w.ndim == 3]  # (H, rows, cols)
    assert len(matrices) == 2
    per_call = sum(
        config.ns_steps * (4 * min(w.shape[1:]) ** 2 * max(w.shape[1:]) + 2 * min(w.shape[1:]) ** 3)
        for w in matrices
    )
    hand = per_call * H * T // b  # muon_per_chunk: one Newton-Schulz per chunk and head
    assert hand <= forward.flops["newton_schulz"] <= 1.1 * hand


def test_rest_of_a_deltanet_layer_is_its_projections():
    T, d_model = 64, 64
    _, forward, _ = _counts("deltanet", d_model, 4, T)
    projections = 5 * 2 * d_model * d_model * T  # q, k, v, output gate, output
    assert projections <= forward.flops["rest"] <= 1.15 * projections


def test_parts_partition_the_total_and_land_where_the_preset_has_them():
    muon = {"atlas", "atlas_pp", "mag", "mal"}
    attention = {"transformer", "swa", "mag", "mal"}
    for preset in ae.presets.__all__:
        _, forward, backward = _counts(preset, 16, 2, 16)
        for count in (forward, backward):
            assert sum(count.flops[p] for p in PARTS) == count.total > 0
            assert (count.flops["newton_schulz"] > 0) == (preset in muon), preset
            assert (count.flops["attention"] > 0) == (preset in attention), preset
            assert (count.flops["memory"] > 0) == (preset not in {"transformer", "swa"}), preset
            assert count.unknown == set(), preset
        assert backward.total > forward.total, preset
    _, deltanet, _ = _counts("deltanet", 16, 2, 16)
    assert deltanet.flops["feature_map"] == 0  # identity map
    _, atlas, _ = _counts("atlas", 16, 2, 16)
    assert atlas.flops["feature_map"] > 0


def test_measure_size_without_timing_counts_per_token():
    config = FlopsBenchConfig(presets=("deltanet",), seq_len=16)
    (row,) = measure_size(config, 16, 2, timed=False)["rows"]
    _, forward, _ = _counts("deltanet", 16, 2, 16)
    assert row["forward"]["total"] == pytest.approx(forward.total / 16)
    # Work on the parameters alone (not on x) is done once per batch, not per sequence.
    batched = FlopsBenchConfig(presets=("deltanet",), seq_len=16, batch=2)
    (row2,) = measure_size(batched, 16, 2, timed=False)["rows"]
    assert row2["forward"]["total"] <= row["forward"]["total"]


def test_cli_prints_both_tables(tmp_path, capsys):
    argv = ["bench", "flops", "--presets", "deltanet", "transformer", "--d-model", "16"]
    argv += ["--n-heads", "2", "--seq-len", "16", "--gemm-size", "32", "--repeats", "1"]
    assert main(argv + ["--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = (
        "| preset | forward kFLOP/token | memory | feature map | Newton-Schulz | attention | rest |"
    )
    assert header in out
    assert "| f+b tokens/s | GFLOP/s | of GEMM |" in out
    assert "| deltanet |" in out and "| transformer |" in out
    assert "GEMM peak: float32 32^3 matmul" in out
    page = (tmp_path / "results.md").read_text()
    assert "atlas-eqx bench flops --presets deltanet transformer" in page

"""The write-strength probe (experiments/studies/_probe.py) against closed forms and planted failures."""

import math

import jax
import pytest

import atlas_eqx as ae
from experiments.cli import main
from experiments.studies import _probe


def _linear_layer(eta: float, *, optimizer: str = "gd", init_std: float | None = 0.0, d=8, H=2):
    """A linear memory, constant step `eta`, c = 1, b = 1, no decay, no convolution."""
    config = ae.MemoryLayerConfig(
        d_model=d,
        n_heads=H,
        memory="linear",
        memory_init_std=init_std,
        learn_initial_memory=False,
        feature_map="identity",
        optimizer=optimizer,
        momentum_gate=False,
        lr_gate=False,
        lr_max=eta,
        lr_init=eta / 2,
        decay_gate=False,
        window=1,
        chunk_size=1,
        gamma_mode="none",
        conv_size=0,
    )
    return ae.MemoryLayer(config, key=jax.random.key(0))


@pytest.mark.parametrize("eta", [0.3, 0.9, 1.7])
def test_one_gd_write_into_zero_memory_has_gain_eta(eta):
    # W_1 = eta v k^T from W_0 = 0, so the read of the same unit key is y = eta v, y0 = 0:
    # ||y - y0|| / ||v - y0|| = eta.
    result = _probe.probe_layer(
        _linear_layer(eta), n_writes=1, long_tokens=0, key=jax.random.key(1)
    )
    assert result.write_gain == pytest.approx(eta, rel=1e-9)
    assert result.gains_by_scale == pytest.approx((eta, eta, eta), rel=1e-9)
    assert math.isnan(result.gain_vs_read)  # y0 = 0
    assert result.recall == 1.0
    assert result.finite is None and result.long_tokens == 0


def test_gain_of_gd_is_flat_in_the_value_scale_and_muon_falls():
    scales = (1.0, 3.0, 10.0)
    gd = _probe.probe_layer(
        _linear_layer(0.5), n_writes=4, value_scales=scales, long_tokens=0, key=jax.random.key(2)
    )
    assert gd.gains_by_scale == pytest.approx((gd.write_gain,) * 3, rel=1e-5)
    assert 0.2 < gd.write_gain < 0.8
    muon = _probe.probe_layer(
        _linear_layer(0.5, optimizer="muon"),
        n_writes=4,
        value_scales=scales,
        long_tokens=0,
        key=jax.random.key(2),
    )
    g1, g3, g10 = muon.gains_by_scale
    assert g1 > 1.5 * g3 > 1.5 * 1.5 * g10
    # One write: Newton-Schulz of -s v k^T does not depend on s, so the gain is exactly 1/s.
    one = _probe.probe_layer(
        _linear_layer(0.5, optimizer="muon"),
        n_writes=1,
        value_scales=scales,
        long_tokens=0,
        key=jax.random.key(3),
    )
    products = [g * s for g, s in zip(one.gains_by_scale, scales, strict=True)]
    assert products == pytest.approx([products[0]] * 3, rel=1e-5)


def test_growth_detects_a_planted_divergence_and_a_stable_layer_stays_bounded(monkeypatch):
    monkeypatch.setattr(_probe, "PIECE_TOKENS", 50)  # several pieces, carried state
    # The delta rule with eta = 10 on unit keys multiplies W by (I - 10 k k^T): eigenvalue -9.
    bad = _probe.probe_layer(
        _linear_layer(10.0, init_std=None, d=4, H=1),
        n_writes=2,
        long_tokens=300,
        key=jax.random.key(4),
    )
    assert bad.norm_start > 0
    assert bad.finite is False or bad.growth > 1e3
    if bad.finite is False:
        assert bad.growth == math.inf and bad.diverged_at is not None
    # eta = 1: each step projects out the key direction and writes a unit value, so |W| stays
    # bounded by about |W_0| + sqrt(d).
    good = _probe.probe_layer(
        _linear_layer(1.0, init_std=None, d=4, H=1),
        n_writes=2,
        long_tokens=300,
        key=jax.random.key(4),
    )
    assert good.finite is True and good.diverged_at is None and good.long_tokens == 300
    assert 0 < good.growth < 5
    assert good.growth == pytest.approx(good.norm_max / good.norm_start)


def test_cli_writes_the_table_with_attention_and_kernel_rows(tmp_path, capsys):
    out = tmp_path / "probe.md"
    argv = ["probe", "--presets", "deltanet", "swdt", "transformer", "--long-tokens", "40"]
    argv += ["--d-model", "8", "--n-heads", "2", "--n-writes", "2", "--out", str(out)]
    assert main(argv) == 0
    text = out.read_text()
    assert f"Command: `atlas-eqx {' '.join(argv)}`" in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert "attention: no fast weights" in rows["transformer"]
    assert "kernel memory" in rows["swdt"] and "| yes |" in rows["swdt"]
    assert "| 40 |" in rows["deltanet"] and "| yes |" in rows["deltanet"]
    assert text in capsys.readouterr().out

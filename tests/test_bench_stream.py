"""The `stream` part of `atlas-eqx bench peers` (issue 8 item 4): streaming in calls with the
carried state equals one `omega_scan` over the concatenated tokens (the claim behind
"streaming"), the rows carry the fields the table needs, the exact-Muon budget rule, and
`--skip stream` / `--ten-million`. No torch needed; speed is never asserted."""

import dataclasses
import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import _peers as bp, _stream as bs, _stream_scan as scan, _subprocess as sub
from experiments.cli import main


MEMORIES = tuple(scan.STREAM_MEMORIES)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(state, eqx.is_array))]


@pytest.mark.parametrize("name", MEMORIES)
def test_streaming_with_the_carried_state_equals_one_scan_float64(name):
    """Three calls of 16 tokens (chunk 8) with the carried `OmegaState` = one `omega_scan`
    over the 48 tokens: every read and the final state (weights, momentum, window)."""
    setup = scan.stream_setup(name, head_dim=8, chunk=8, dtype=jnp.float64)
    key = jax.random.key(3)
    pieces = [scan.stream_inputs(key, i, 16, 8, jnp.float64) for i in range(3)]
    state = scan.initial_stream_state(setup)
    ys = []
    for q, k, v in pieces:
        y, state = scan.stream_scan(setup, state, q, k, v)
        ys.append(y)
    whole = [jnp.concatenate(parts) for parts in zip(*pieces, strict=True)]
    y_one, state_one = scan.stream_scan(setup, scan.initial_stream_state(setup), *whole)
    assert y_one.dtype == jnp.float64
    np.testing.assert_allclose(np.concatenate(ys), y_one, rtol=1e-10, atol=1e-12)
    for a, b in zip(_leaves(state), _leaves(state_one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # The carried state moved: the calls did write the memory.
    w0 = _leaves(scan.initial_stream_state(setup).memory)
    assert any(not np.allclose(a, b) for a, b in zip(_leaves(state.memory), w0, strict=True))


def test_the_compiled_bench_call_is_one_program_and_equals_one_scan_float32():
    """The program the benchmark runs (inputs drawn inside, index as an array) compiles once
    and its carried state after 3 calls equals one float32 scan over the same tokens."""
    name = "atlas muon_per_chunk"
    # At the preset's step (0.25 per token) the per-chunk Muon recurrence amplifies float32
    # rounding to the percent level within these 96 tokens (jit against eager, measured), so
    # a float32 comparison cannot tell a wrong program from rounding there; at a step of 0.05
    # it is contracting. The float64 test above checks the preset's own step exactly.
    setup = {**scan.stream_setup(name, head_dim=8, chunk=8), "lr": 0.05}
    call = scan.make_stream_call(setup, 32, seed=5)
    state = scan.initial_stream_state(setup)
    totals = []
    for index in range(3):
        state, total = call(state, index)
        totals.append(float(total))
    assert call.traces[0] == 1  # pyright: ignore[reportFunctionMemberAccess]
    key = jax.random.key(5)
    pieces = [scan.stream_inputs(key, jnp.uint32(i), 32, 8, jnp.float32) for i in range(3)]
    whole = [jnp.concatenate(parts) for parts in zip(*pieces, strict=True)]
    y_one, state_one = scan.stream_scan(setup, scan.initial_stream_state(setup), *whole)
    assert y_one.dtype == jnp.float32
    np.testing.assert_allclose(
        totals, [float(jnp.sum(y)) for y in jnp.split(y_one, 3)], rtol=1e-4, atol=1e-4
    )
    # float32, jitted against eager: rounding only (observed ~7e-6 on weights of size ~0.3 at
    # a step of 0.055); the exact identity is the float64 test above.
    for a, b in zip(_leaves(state), _leaves(state_one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def test_the_setup_is_the_presets_memory_configuration():
    atlas = scan.stream_setup("atlas (exact Muon)", head_dim=64, chunk=16)
    c = atlas["config"]
    assert (c.memory, c.optimizer, c.objective, c.window, c.chunk_size) == (
        "mlp",
        "muon",
        "l2",
        4,
        16,
    )
    assert c.feature_map == "elementwise" and c.feature_degree == 2  # the preset's at d 64
    assert atlas["memory"].d_in == 64 and atlas["memory"].residual
    assert atlas["memory"].weights[0].shape == (256, 64)  # hidden 4 d_v
    assert atlas["memory"].weights[0].dtype == jnp.float32
    assert not c.muon_per_chunk
    assert scan.stream_setup("atlas muon_per_chunk", 64, 16)["config"].muon_per_chunk
    titans = scan.stream_setup("titans", 64, 16)["config"]
    assert (titans.optimizer, titans.window, titans.feature_map) == ("momentum", 1, "identity")
    assert "muon (5 NS steps)" in scan.describe_setup(atlas)
    with pytest.raises(ValueError, match="unknown memory"):
        scan.stream_setup("nope", 8, 8)


def _in_process(spec, threads, timeout_s):
    result = scan.measure_stream(spec)
    result["peak_rss_mib"] = sub._peak_rss_mib()
    return result


def test_the_stream_part_at_a_tiny_length_writes_rows_table_and_plot(tmp_path):
    """Two calls of 256 tokens per memory (measured in this process, not a subprocess): every
    row has the fields of the table, and stream.md / stream.png are written."""
    config = dataclasses.replace(bs.QUICK_STREAM_CONFIG, lengths=(512,), exact_lengths=(512,))
    rows, text = bs.write_stream_results(
        config,
        tmp_path,
        command="atlas-eqx bench peers",
        machine="m",
        versions="v",
        run=_in_process,
    )
    assert [r["memory"] for r in rows] == list(MEMORIES)
    for r in rows:
        assert "error" not in r, r
        assert r["T"] == 512 and r["calls"] == 2 and r["timed_tokens"] == 256
        assert r["tok_s"] > 0 and r["first_call_s"] > 0 and r["finite"]
        assert r["compilations"] == 1
        assert r["rss_first_mib"] > 0 and r["rss_end_mib"] > 0
        assert r["peak_rss_mib"] >= r["rss_end_mib"] - 1.0
        assert r["growth_mib"] == pytest.approx(r["rss_end_mib"] - r["rss_first_mib"])
        assert [t for t, _ in r["rss_trace"]] == [256, 512]
        assert r["state_kib"] > 0
    assert (tmp_path / "stream.md").read_text().startswith("# Streaming inference")
    assert "```\natlas-eqx bench peers\n```" in text
    assert "| atlas muon_per_chunk | 512 | 2 |" in text
    assert (tmp_path / "stream.png").exists()
    saved = json.loads((tmp_path / "stream.json").read_text())
    assert [r["memory"] for r in saved["rows"]] == list(MEMORIES)


def _fake_run(tok_s):
    calls = []

    def run(spec, threads, timeout_s):
        calls.append((spec["memory"], spec["T"]))
        n = spec["T"] // spec["call_tokens"]
        rate = tok_s[spec["memory"]]
        return dict(
            rss_imports_mib=100.0,
            calls=n,
            call_tokens=spec["call_tokens"],
            first_call_s=1.0,
            stream_s=(n - 1) * spec["call_tokens"] / rate,
            timed_tokens=(n - 1) * spec["call_tokens"],
            rss_first_mib=200.0,
            rss_max_mib=201.0,
            rss_end_mib=201.0,
            rss_trace=[(spec["call_tokens"], 200.0), (spec["T"], 201.0)],
            state_kib=10.0,
            compilations=1,
            setup="s",
            finite=True,
            peak_rss_mib=210.0,
        )

    return run, calls


def test_exact_muon_runs_only_where_its_measured_speed_fits_the_budget():
    config = bs.StreamBenchConfig(
        lengths=(4096, 8192, 65536), exact_lengths=(4096,), exact_budget_s=10.0, call_tokens=1024
    )
    run, calls = _fake_run({scan.EXACT: 1000.0, "atlas muon_per_chunk": 1e4, "titans": 1e5})
    rows, notes = bs.run_stream_benchmark(config, run=run)
    exact = [T for name, T in calls if name == scan.EXACT]
    assert exact == [4096, 8192]  # 8192 / 1000 = 8 s fits; 65536 / 1000 = 66 s does not
    assert [T for name, T in calls if name == "titans"] == [4096, 8192, 65536]
    assert len(notes) == 1 and "65,536" in notes[0] and "66 s" in notes[0]
    text = bs.stream_markdown(
        rows, notes, config, command="c", machine="m", versions="v", plotted=False
    )
    assert "Exact Muon streams 1,000 tok/s here, so T = 65,536 would take about 1 min" in text
    assert "muon_per_chunk=True" in text
    assert "Left out" in text and "titans**: growth +1.0 MiB at 4K (4,096)" in text


def test_bad_stream_configurations_raise():
    with pytest.raises(ValueError, match="multiple of `chunk`"):
        bs.StreamBenchConfig(call_tokens=100, chunk=16)
    with pytest.raises(ValueError, match="multiple of `call_tokens`"):
        bs.StreamBenchConfig(lengths=(5000,))
    with pytest.raises(ValueError, match="unknown memories"):
        bs.StreamBenchConfig(memories=("atlas",))
    with pytest.raises(ValueError, match="`head_dim` must be an integer"):
        bs.StreamBenchConfig(head_dim=0)


@pytest.fixture
def no_peers(monkeypatch):
    """`bench peers` with the torch parts replaced by stubs; records the stream part's calls."""
    seen = []
    monkeypatch.setattr(bp, "require_peers", lambda: (None, None))
    monkeypatch.setattr(bp, "cross_check_numpy", lambda: [])
    monkeypatch.setattr(bp, "cross_check_peers", lambda: [])
    monkeypatch.setattr(bp, "_versions", lambda: "stub")
    monkeypatch.setattr(bp, "run_lm_benchmark", lambda config: [])
    monkeypatch.setattr(bp, "plot_results", lambda rows, lm_rows, path: False)
    monkeypatch.setattr(
        bp, "write_stream_results", lambda config, out, **kw: seen.append(config) or ([], "")
    )
    return seen


def test_skip_stream_skips_it_and_ten_million_adds_a_row(no_peers, tmp_path):
    out = str(tmp_path)
    skip_rest = ["--skip", "layers", "profile", "lm"]
    main(["bench", "peers", "--quick", "--out-dir", out, *skip_rest, "stream"])
    assert no_peers == []
    assert not (tmp_path / "results.md").exists()  # layers and lm skipped: kept as it is
    main(["bench", "peers", "--quick", "--out-dir", out, *skip_rest])
    assert no_peers == [bs.QUICK_STREAM_CONFIG]
    main(["bench", "peers", "--out-dir", out, *skip_rest, "--ten-million"])
    assert no_peers[-1].lengths == bs.StreamBenchConfig().lengths + (bs.TEN_MILLION,)
    with pytest.raises(SystemExit, match="--ten-million .* --skip stream"):
        main(["bench", "peers", "--out-dir", out, "--skip", "stream", "--ten-million"])
    with pytest.raises(SystemExit, match="--quick"):
        main(["bench", "peers", "--quick", "--out-dir", out, "--ten-million"])


def test_results_md_points_to_the_stream_page(no_peers, tmp_path):
    main(["bench", "peers", "--quick", "--out-dir", str(tmp_path), "--skip", "layers", "profile"])
    text = (tmp_path / "results.md").read_text()
    assert "## 4. Streaming inference (part `stream`)" in text and "[stream.md](stream.md)" in text
    assert len(no_peers) == 1
    main(["bench", "peers", "--quick", "--out-dir", str(tmp_path), "--skip", "layers", "stream"])
    assert "not rerun in this run" in (tmp_path / "results.md").read_text()
    assert len(no_peers) == 1


@pytest.mark.slow
def test_the_stream_part_in_its_pinned_subprocesses(tmp_path):
    """The real plumbing: one subprocess per row through `run_child`."""
    config = dataclasses.replace(
        bs.QUICK_STREAM_CONFIG, lengths=(512,), exact_lengths=(512,), memories=("titans",)
    )
    rows, _ = bs.run_stream_benchmark(config)
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["peak_rss_mib"] >= rows[0]["rss_imports_mib"] > 0
    assert rows[0]["compilations"] == 1 and rows[0]["finite"]
    assert pathlib.Path(bs.__file__).name == "_stream.py"


def test_a_subprocess_peak_is_its_own_not_the_parents():
    """`ru_maxrss` of a child started by `subprocess` carries the parent's high-water mark on
    Linux; `_peak_rss_mib` (VmHWM) must not: a bare child of this big process stays small."""
    import subprocess
    import sys

    if not pathlib.Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    ballast = np.ones(600 * 2**20 // 8)  # make sure this process has a peak above 600 MiB
    rss = sub._rss_mib()
    parent_peak = sub._peak_rss_mib()  # read after: the high-water mark cannot fall below it
    assert parent_peak >= rss > 550
    code = "from experiments.bench._subprocess import _peak_rss_mib; print(_peak_rss_mib())"
    env = sub._child_environment(1)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    # The child imports jax (~200-250 MiB); with the inherited ru_maxrss it would read at
    # least the parent's peak.
    assert float(done.stdout.strip()) < 0.6 * parent_peak, (done.stdout, parent_peak)
    del ballast


def test_stream_memories_selects_the_rows(no_peers, tmp_path):
    out = str(tmp_path)
    skip_rest = ["--skip", "layers", "profile", "lm"]
    main(["bench", "peers", "--out-dir", out, *skip_rest, "--stream-memories", "titans"])
    assert no_peers[-1].memories == ("titans",)
    with pytest.raises(SystemExit, match="--stream-memories .* --skip stream"):
        main(
            [
                "bench",
                "peers",
                "--out-dir",
                out,
                *skip_rest,
                "stream",
                "--stream-memories",
                "titans",
            ]
        )
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["bench", "peers", "--out-dir", out, "--stream-memories", "atlas"])
    # The parser's choices are the module's names.
    import argparse

    from experiments.cli import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    bench = commands.choices["bench"]
    option = next(a for a in bench._actions if a.dest == "stream_memories")
    assert list(option.choices or ()) == list(scan.STREAM_MEMORIES)

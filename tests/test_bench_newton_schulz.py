"""`atlas-eqx bench newton-schulz` (issue 23 item 4): the counted FLOPs of both forms against
hand counts, and the CLI's table at a tiny size (speed is never a timed test)."""

import pytest

from experiments.bench._newton_schulz_bench import measure_shape, NewtonSchulzBenchConfig
from experiments.cli._main import main


@pytest.mark.parametrize("shape", [(3, 4, 8), (2, 8, 4)])
def test_matrix_flops_are_the_hand_counts(shape):
    """Per step on the wide orientation (m <= n): the forward forms A = XX^T, A^2 and PX; our
    reverse pass adds the transposed tangent rule (X Xdot^T, A Adot, P Xdot, Pdot X), where
    differentiating the plain steps forms both A dA and dA A and both dA X and dA^T X. The
    gradient does not need the last step's PX (the loss is linear in NS(G)), and `count_flops`
    drops dead code; the plain steps run in a `lax.scan`, whose last product stays."""
    batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    steps = 5
    rows_by_key = {
        (row["form"], row["pass_"]): row
        for row in measure_shape(NewtonSchulzBenchConfig(steps=steps), shape, timed=False)["rows"]
    }
    forward = 4 * m * m * n + 2 * m**3
    expected = {
        ("newton_schulz", "forward"): forward,
        ("plain", "forward"): forward,
        ("newton_schulz", "f+b"): forward + 6 * m * m * n + 2 * m**3,
        ("plain", "f+b"): forward + 8 * m * m * n + 4 * m**3,
    }
    dead = {("newton_schulz", "f+b"): 2 * m * m * n}
    for key, per_step in expected.items():
        hand = batch * (steps * per_step - dead.get(key, 0))
        assert rows_by_key[key]["matrix_flops"] == hand, key
        assert rows_by_key[key]["flops"] > rows_by_key[key]["matrix_flops"], key


def test_cli_prints_the_table_and_writes_the_page(tmp_path, capsys):
    argv = ["bench", "newton-schulz", "--shapes", "2x4x8", "--gemm-size", "32", "--repeats", "1"]
    assert main(argv + ["--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "## 2 matrices of 4 x 8, 5 steps" in out
    header = (
        "| form | pass | MFLOP | of which matrix products | ms | GFLOP/s | of GEMM | plain / this |"
    )
    assert header in out
    for form in ("newton_schulz", "plain"):
        for label in ("forward", "f+b"):
            assert f"| `{form}` | {label} |" in out
    assert out.count("| 1.00x |") >= 2  # the plain rows against themselves
    page = (tmp_path / "results.md").read_text()
    assert "atlas-eqx bench newton-schulz --shapes 2x4x8" in page
    assert (tmp_path / "results.json").exists()


@pytest.mark.parametrize("shapes", [["2x4"], ["2x4x0"], ["axbxc"]])
def test_cli_rejects_malformed_shapes(shapes):
    with pytest.raises(SystemExit, match="--shapes takes BATCHxMxN"):
        main(["bench", "newton-schulz", "--shapes", *shapes])

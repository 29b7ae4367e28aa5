"""Mistakes at `omega_scan`'s boundary raise, with a message that names the argument (DESIGN.md,
"Reliability"; digest I-40 for the gate ranges).

Shape, rank and dtype mistakes are caught by jaxtyping + beartype (`jaxtyping.TypeCheckError`,
whose message names the parameter); inconsistent dimensions and options by `ValueError`; values
(gates out of range, NaN) at run time by `eqx.error_if` (`equinox.EquinoxRuntimeError`), also
under `jax.jit`.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

import atlas_eqx as ae
import feature_maps as fm
import optimizers as iopt


T, D = 5, 3


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    return dict(
        q=rng.standard_normal((T, D)),
        k=rng.standard_normal((T, D)),
        v=rng.standard_normal((T, D)),
        lr=np.full(T, 0.1),
        decay=np.full(T, 0.9),
    )


def _memory(d_in: int = D, d_out: int = D) -> ae.LinearMemory:
    return ae.LinearMemory(d_in, d_out, key=jax.random.PRNGKey(0))


def _call(memory=None, **overrides):
    args = {**_inputs(), **overrides}
    memory = _memory() if memory is None else memory
    positional = [args.pop(name) for name in ("q", "k", "v", "lr", "decay")]
    return ae.omega_scan(memory, *positional, **args)


@pytest.fixture(autouse=True)
def _flush_runtime_errors():
    """Wait for (and drop) JAX's runtime tokens after each test. Without this, a runtime error
    raised by a failed `eqx.error_if` here is sometimes reported a second time when JAX waits
    for its tokens at interpreter exit ("Exception ignored in atexit callback ... CpuCallback
    error"); harmless (the exit status is unchanged) but confusing in a CI log."""
    yield
    try:
        jax.effects_barrier()
    except jax.errors.JaxRuntimeError:  # the error the test just checked for
        pass


def _parameter(name: str) -> str:
    return re.escape(f"parameter '{name}'")


# --------------------------------------------------------------------------------------------
# Shapes, ranks, dtypes: jaxtyping names the parameter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("k", np.ones((T - 1, D))),
        ("v", np.ones((T + 1, D))),
        ("lr", np.full(T - 1, 0.1)),
        ("decay", np.full(T + 2, 0.9)),
        ("momentum", np.full(T - 1, 0.5)),
        ("gamma", np.full(T - 1, 0.5)),
        ("gamma", np.full((T - 1, 1), 0.5)),
    ],
    ids=lambda x: x if isinstance(x, str) else str(np.shape(x)),
)
def test_sequence_length_mismatch_names_the_argument(name, value):
    optimizer = iopt.momentum() if name == "momentum" else iopt.gd()
    with pytest.raises(TypeCheckError, match=_parameter(name)):
        _call(**{name: value}, optimizer=optimizer)


def test_key_dimension_mismatch_between_q_and_k_names_k():
    with pytest.raises(TypeCheckError, match=_parameter("k")):
        _call(k=np.ones((T, D + 1)))


@pytest.mark.parametrize(
    "name, value",
    [
        ("q", np.ones(D)),
        ("k", np.ones((T, D, 1))),
        ("v", np.ones(T)),
        ("lr", np.full((T, 1), 0.1)),
        ("decay", np.float64(0.9)),
    ],
    ids=lambda x: x if isinstance(x, str) else str(np.shape(x)),
)
def test_wrong_rank_names_the_argument(name, value):
    with pytest.raises(TypeCheckError, match=_parameter(name)):
        _call(**{name: value})


@pytest.mark.parametrize("name", ["q", "k", "v", "lr"])
def test_integer_dtype_is_rejected(name):
    value = _inputs()[name].astype(np.int32)
    with pytest.raises(TypeCheckError, match=_parameter(name)):
        _call(**{name: value})


def test_unknown_method_names_method():
    with pytest.raises((TypeCheckError, ValueError), match="method"):
        _call(method="recurrent")


# --------------------------------------------------------------------------------------------
# Dimensions and options: ValueError with the argument's name and the expected value
# --------------------------------------------------------------------------------------------


def test_feature_dimension_must_match_memory_d_in():
    """Polynomial(2) maps d_k = 3 to 10 features; a memory built for d_k is the wrong size."""
    phi = fm.Polynomial(2)
    assert phi.out_dim(D) == 10
    with pytest.raises(ValueError, match=r"d_in=3.*`feature_map`.*feature_map\.out_dim\(d_k\)=10"):
        _call(feature_map=phi)


def test_value_dimension_must_match_memory_d_out():
    with pytest.raises(ValueError, match=r"`v` has d_v=3.*d_out=2"):
        _call(memory=_memory(d_out=2))


@pytest.mark.parametrize("window", [0, -1])
def test_window_must_be_positive(window):
    with pytest.raises(ValueError, match=r"`window` \(c\) must be an integer >= 1"):
        _call(window=window)


@pytest.mark.parametrize("chunk_size", [0, -2])
def test_chunk_size_must_be_positive(chunk_size):
    with pytest.raises(ValueError, match=r"`chunk_size` \(b\) must be an integer >= 1"):
        _call(chunk_size=chunk_size)


def test_per_step_gamma_must_have_window_columns():
    with pytest.raises(ValueError, match=r"per-step `gamma` must have shape \(T, window\)"):
        _call(gamma=np.full((T, 3), 0.5), window=2)


def test_momentum_needs_an_optimizer_with_momentum():
    with pytest.raises(ValueError, match=r"`momentum` was given but `optimizer`"):
        _call(momentum=np.full(T, 0.5), optimizer=iopt.gd())


@pytest.mark.parametrize("other_window", [1, 3])
def test_state_built_for_another_window(other_window):
    state = ae.init_omega_state(_memory(), iopt.gd(), window=other_window)
    with pytest.raises(ValueError, match=r"`state` carries .* window=2 needs 1"):
        _call(state=state, window=2)


def test_state_built_for_another_feature_dimension():
    state = ae.init_omega_state(_memory(d_in=10), iopt.gd(), window=2)
    with pytest.raises(ValueError, match=r"`state` carries 1 window tokens of dimension 10"):
        _call(state=state, window=2)


def test_init_omega_state_window_must_be_positive():
    with pytest.raises(ValueError, match=r"`window` must be >= 1"):
        ae.init_omega_state(_memory(), iopt.gd(), window=0)


@pytest.mark.parametrize("cls", [ae.MLPMemory, ae.GatedMLPMemory])
def test_residual_needs_equal_dimensions(cls):
    with pytest.raises(ValueError, match=r"`residual=True` needs d_in == d_out.*d_in=3, d_out=2"):
        cls(3, 2, key=jax.random.PRNGKey(0), residual=True)


# --------------------------------------------------------------------------------------------
# Values: eqx.error_if at run time, eagerly and under jit
# --------------------------------------------------------------------------------------------

_BAD_VALUES = [
    ("lr", -0.1, r"`lr` \(eta_t\) must be >= 0.0"),
    ("lr", np.nan, r"`lr` \(eta_t\) must be >= 0.0 \(and not NaN\)"),
    ("decay", 1.5, r"`decay` \(alpha_t\) must be in \[0.0, 1.0\]"),
    ("decay", -0.5, r"`decay` \(alpha_t\) must be in \[0.0, 1.0\]"),
    ("momentum", 1.01, r"`momentum` \(theta_t\) must be in \[0.0, 1.0\]"),
    ("gamma", -0.2, r"`gamma` \(gamma\) must be in \[0.0, 1.0\]"),
    ("gamma", 2.0, r"`gamma` \(gamma\) must be in \[0.0, 1.0\]"),
    ("q", np.nan, r"`q` contains NaN or inf"),
    ("k", np.inf, r"`k` contains NaN or inf"),
    ("v", np.nan, r"`v` contains NaN or inf"),
    ("v", -np.inf, r"`v` contains NaN or inf"),
]


def _with_bad_value(name: str, bad: float) -> dict:
    args = _inputs()
    args["momentum"] = np.full(T, 0.5)
    args["gamma"] = np.full(T, 0.5)
    value = np.array(args[name], dtype=np.float64)
    value.reshape(-1)[2] = bad  # one entry in the middle of the sequence
    args[name] = value
    return args


@pytest.mark.parametrize("name, bad, message", _BAD_VALUES, ids=lambda x: str(x)[:12])
def test_out_of_range_values_raise_eagerly(name, bad, message):
    args = _with_bad_value(name, bad)
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        _call(**args, optimizer=iopt.momentum())


_jitted_scan = eqx.filter_jit(ae.omega_scan)


@pytest.mark.parametrize("name, bad, message", _BAD_VALUES, ids=lambda x: str(x)[:12])
def test_out_of_range_values_raise_under_jit(name, bad, message):
    args = _with_bad_value(name, bad)
    q, k, v, lr, decay, momentum, gamma = (
        jnp.asarray(args[n]) for n in ("q", "k", "v", "lr", "decay", "momentum", "gamma")
    )
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        y, _ = _jitted_scan(
            _memory(), q, k, v, lr, decay, momentum, gamma, optimizer=iopt.momentum()
        )
        y.block_until_ready()


def test_huge_finite_inputs_do_not_raise():
    """The finiteness check sums x * 0, which is 0 for every finite x: no overflow to inf from
    the sum of large entries (a sum of x itself would overflow here)."""
    args = _inputs()
    largest = np.finfo(np.asarray(_memory().weight).dtype).max  # the dtype the scan runs in
    for name in ("q", "k", "v"):
        args[name] = np.full_like(args[name], largest / 2)
    y, _ = _call(**args, optimizer=iopt.momentum(), check_values=True)
    assert np.asarray(y).shape == (T, D)


def test_valid_edge_values_do_not_raise():
    """The ranges are closed: eta = 0, alpha in {0, 1}, theta in {0, 1}, gamma in {0, 1} pass,
    and the result is exact (alpha = 0 at the last token with gamma = 0 there erases W)."""
    args = _inputs()
    args["lr"][:] = 0.0
    args["decay"][:] = [1.0, 0.0, 1.0, 1.0, 0.0]
    args["momentum"] = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    args["gamma"] = np.array([0.0, 1.0, 0.0, 1.0, 0.0])
    y, state = _call(**args, optimizer=iopt.momentum())
    assert isinstance(state.memory, ae.LinearMemory)
    np.testing.assert_array_equal(np.asarray(state.memory.weight), np.zeros((D, D)))
    np.testing.assert_array_equal(np.asarray(y)[1:], np.zeros((T - 1, D)))


@pytest.mark.parametrize("optimizer", [iopt.gd(), iopt.momentum()])
def test_muon_per_chunk_needs_muon(optimizer):
    with pytest.raises(ValueError, match="muon_per_chunk"):
        _call(method="chunked", chunk_size=2, optimizer=optimizer, muon_per_chunk=True)


def test_muon_per_chunk_rejects_decay_first():
    with pytest.raises(ValueError, match="muon_per_chunk.*decay_first"):
        _call(
            method="chunked",
            chunk_size=2,
            optimizer=iopt.muon(),
            muon_per_chunk=True,
            decay_first=True,
        )


def test_an_empty_sequence_is_named_at_every_entry():
    with pytest.raises(ValueError, match=r"`q` is empty \(T = 0\)"):
        _call(**{name: value[:0] for name, value in _inputs().items()})
    with pytest.raises(ValueError, match=r"`q` is empty \(T = 0\)"):
        ae.kernel_memory_scan(np.zeros((0, D)), np.zeros((0, D)), np.zeros((0, D)))
    key = jax.random.PRNGKey(0)
    for preset, name in [
        ("deltanet", "MemoryLayer"),
        ("deep_transformer", "MemoryLayer"),
        ("transformer", "AttentionLayer"),
        ("mag", "MAGLayer"),
        ("mal", "MALLayer"),
    ]:
        layer = getattr(ae.presets, preset)(8, 2, key=key)
        with pytest.raises(ValueError, match=rf"{name}: `x` is empty \(T = 0\)"):
            layer(jnp.zeros((0, 8)))
        with pytest.raises(ValueError, match=rf"{name}: `x` is empty \(T = 0\)"):
            layer.stream(jnp.zeros((0, 8)), layer.init_state(4))


def test_a_state_of_another_learner_is_named():
    _, gd_state = _call()
    theta = np.full(T, 0.5)
    for method in ("sequential", "chunked"):
        with pytest.raises(ValueError, match="`state` was made for another inner learner"):
            _call(momentum=theta, optimizer=iopt.momentum(), state=gd_state, method=method)


class _WrongOutDim(fm.AbstractFeatureMap):
    def __call__(self, x):
        return jnp.concatenate([x, x * x], axis=-1)

    def out_dim(self, d: int) -> int:
        return d


class _WrongWidth(ae.AbstractMemory):
    weight: jax.Array
    d_in: int = eqx.field(static=True)
    d_out: int = eqx.field(static=True)

    def __init__(self):
        self.weight = jnp.ones((D + 2, D))
        self.d_in, self.d_out = D, D

    def __call__(self, x):
        return self.weight @ x


def test_parts_that_misstate_their_dimensions_are_named():
    with pytest.raises(ValueError, match=r"`feature_map` \(_WrongOutDim\) declares out_dim\(3\)"):
        _call(feature_map=_WrongOutDim())
    for method in ("sequential", "chunked"):
        with pytest.raises(ValueError, match=r"`memory` \(_WrongWidth\) declares d_out=3.*\(5,\)"):
            _call(memory=_WrongWidth(), method=method)

"""Feature maps: the kernel identities of digest §3 and its invariants I-22 .. I-27.

Maps are applied through one jitted helper, mostly on `(4, d)` arrays, and `(degree, d)` is drawn
from a short list, so that the few distinct programs compile once and are shared by the tests.
"""

import collections
import itertools
import math
from collections.abc import Callable

import equinox as eqx
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given

import feature_maps as fm


FORMS = st.sampled_from(["monomial", "tensor"])
# (degree, d) pairs: every degree 1..4 and d in {1, 2, 3, 5}, without the full product.
DEGREE_AND_DIM = st.sampled_from([(1, 5), (2, 1), (2, 3), (3, 2), (4, 3)])
DIMS = st.sampled_from([1, 2, 3, 5])
# (P, d) for the truncated exponential: P in {1, 2, 4, 8} as in I-27.
ORDER_AND_DIM = st.sampled_from([(1, 5), (2, 1), (2, 3), (4, 2), (8, 3)])
SEEDS = st.integers(0, 2**31 - 1)
N = 4  # rows of every input batch
RF_FEATURES = 20_000  # every RandomFeatures in this file, so W is drawn with few shapes


@eqx.filter_jit
def _phi(phi: fm.AbstractFeatureMap, x):
    return phi(x)


def _features(phi: fm.AbstractFeatureMap, x) -> np.ndarray:
    return np.asarray(_phi(phi, jnp.asarray(x)))


def _gram(phi: fm.AbstractFeatureMap, X, Y) -> np.ndarray:
    """<phi(x_a), phi(y_b)> for all pairs of rows."""
    return _features(phi, X) @ _features(phi, Y).T


def _floats(bound: float) -> st.SearchStrategy[float]:
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def _array(data: st.DataObject, shape: tuple[int, ...], bound: float = 2.0) -> np.ndarray:
    return data.draw(hnp.arrays(np.float64, shape, elements=_floats(bound)))


def _positive_coefficients(data: st.DataObject, n: int) -> tuple[float, ...]:
    return tuple(data.draw(st.lists(st.floats(0.05, 3.0), min_size=n, max_size=n)))


def _taylor(degrees) -> np.ndarray:
    return np.array([1 / math.factorial(i) for i in degrees])


def _closed_form(coefficients, degrees, s) -> np.ndarray:
    """sum_i a_i s^i in numpy float64."""
    s = np.asarray(s, dtype=np.float64)
    terms = [a * s**i for a, i in zip(np.asarray(coefficients), degrees, strict=True)]
    return np.sum(terms, axis=0)


def _kernel_scale(coefficients, degrees, X, Y) -> np.ndarray:
    """sum_i a_i (|x|.|y|)^i (element-wise absolute values): the magnitude that the rounding
    error of the kernel is relative to, plus a floor for results that underflow."""
    return _closed_form(coefficients, degrees, np.abs(X) @ np.abs(Y).T) + 1e-290


# ---------------------------------------------------------------------------------------------
# I-22: <phi_a(q), phi_a(k)> = sum_i a_i (q.k)^i


@given(
    form=FORMS,
    include_constant=st.booleans(),
    degree_and_dim=DEGREE_AND_DIM,
    random_coefficients=st.booleans(),
    data=st.data(),
)
def test_polynomial_kernel_identity(
    form, include_constant, degree_and_dim, random_coefficients, data
):
    """I-22 for both forms, with and without the constant, default and random positive a_i."""
    degree, d = degree_and_dim
    degrees = tuple(range(0 if include_constant else 1, degree + 1))
    if random_coefficients:
        a = np.array(_positive_coefficients(data, len(degrees)))
        phi = fm.Polynomial(
            degree, form=form, include_constant=include_constant, coefficients=tuple(a)
        )
    else:
        a = _taylor(degrees)
        phi = fm.Polynomial(degree, form=form, include_constant=include_constant)
    assert phi.degrees == degrees
    np.testing.assert_allclose(np.asarray(phi.coefficients), a, rtol=1e-13)

    X, Y = _array(data, (N, d)), _array(data, (N, d))
    error = np.abs(_gram(phi, X, Y) - _closed_form(a, degrees, X @ Y.T))
    assert np.all(error <= 1e-10 * _kernel_scale(a, degrees, X, Y))


@given(include_constant=st.booleans(), degree_and_dim=DEGREE_AND_DIM, data=st.data())
def test_tensor_and_monomial_forms_give_the_same_kernel(include_constant, degree_and_dim, data):
    """I-22: the compressed monomial form has the tensor form's kernel."""
    degree, d = degree_and_dim
    a = _positive_coefficients(data, degree + include_constant)
    monomial, tensor = (
        fm.Polynomial(degree, form=form, include_constant=include_constant, coefficients=a)
        for form in ("monomial", "tensor")
    )
    X, Y = _array(data, (N, d)), _array(data, (N, d))
    scale = _kernel_scale(a, monomial.degrees, X, Y)
    assert np.all(np.abs(_gram(monomial, X, Y) - _gram(tensor, X, Y)) <= 1e-10 * scale)


@given(order_and_dim=ORDER_AND_DIM, data=st.data())
def test_taylor_exp_kernel_identity(order_and_dim, data):
    """ATLAS Eq 4: <phi(q), phi(k)> = sum_{i<=P} (q.k)^i / i!, the Polynomial's default."""
    order, d = order_and_dim
    phi = fm.TaylorExp(order)
    degrees = range(order + 1)
    a = _taylor(degrees)
    np.testing.assert_array_equal(np.asarray(phi.coefficients), a)
    assert not jax.tree.leaves(eqx.filter(phi, eqx.is_array))  # nothing to learn
    X, Y = _array(data, (N, d)), _array(data, (N, d))
    scale = _kernel_scale(a, degrees, X, Y)
    K = _gram(phi, X, Y)
    assert np.all(np.abs(K - _closed_form(a, degrees, X @ Y.T)) <= 1e-10 * scale)
    assert np.all(np.abs(K - _gram(fm.Polynomial(order), X, Y)) <= 1e-10 * scale)


def test_taylor_exp_temperature():
    """tau scales the inputs: the kernel is sum_i (tau^2 q.k)^i / i!, and tau = d^{-1/4} on
    both sides approximates the softmax kernel exp(q.k / sqrt(d))."""
    d, order = 3, 8
    tau = d**-0.25
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(N, d)) / 2, rng.normal(size=(N, d)) / 2
    K = _gram(fm.TaylorExp(order, temperature=tau), X, Y)
    degrees = range(order + 1)
    np.testing.assert_allclose(K, _closed_form(_taylor(degrees), degrees, tau**2 * X @ Y.T))
    np.testing.assert_allclose(K, np.exp(X @ Y.T / math.sqrt(d)), rtol=1e-6)


def _reference_monomial(x: np.ndarray, a, degrees) -> np.ndarray:
    """sqrt(a_|b| * multinomial(|b|; b)) x^b, degree by degree, lexicographic within a degree."""
    out = []
    for a_i, i in zip(a, degrees, strict=True):
        for combo in itertools.combinations_with_replacement(range(x.shape[-1]), i):
            multinomial = math.factorial(i)
            for count in collections.Counter(combo).values():
                multinomial //= math.factorial(count)
            out.append(math.sqrt(a_i * multinomial) * math.prod(x[j] for j in combo))
    return np.array(out)


def _reference_tensor(x: np.ndarray, a, degrees) -> np.ndarray:
    """concat_i sqrt(a_i) x^{(x) i} with np.kron, x^{(x) 0} = [1]."""
    out = []
    for a_i, i in zip(a, degrees, strict=True):
        power = np.ones(1)
        for _ in range(i):
            power = np.kron(x, power)
        out.append(math.sqrt(a_i) * power)
    return np.concatenate(out)


@given(
    form=FORMS,
    include_constant=st.booleans(),
    degree_and_dim=DEGREE_AND_DIM,
    data=st.data(),
)
def test_polynomial_entries_match_definition(form, include_constant, degree_and_dim, data):
    """The entries themselves, not only the kernel, are the documented ones, in their order."""
    degree, d = degree_and_dim
    a = _positive_coefficients(data, degree + include_constant)
    phi = fm.Polynomial(degree, form=form, include_constant=include_constant, coefficients=a)
    X = _array(data, (N, d))
    reference = _reference_tensor if form == "tensor" else _reference_monomial
    expected = np.stack([reference(x, a, phi.degrees) for x in X])
    np.testing.assert_allclose(_features(phi, X), expected, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# I-23: dimensions


@given(form=FORMS, include_constant=st.booleans(), degree_and_dim=DEGREE_AND_DIM)
def test_polynomial_dimensions(form, include_constant, degree_and_dim):
    """I-23: tensor sum_i d^i, monomial C(d+p, p); pure degree d^i or C(d+i-1, i)."""
    degree, d = degree_and_dim
    phi = fm.Polynomial(degree, form=form, include_constant=include_constant)
    start = 0 if include_constant else 1
    if form == "tensor":
        blocks = tuple(d**i for i in range(start, degree + 1))
        total = sum(d**i for i in range(start, degree + 1))
    else:
        blocks = tuple(math.comb(d + i - 1, i) for i in range(start, degree + 1))
        total = math.comb(d + degree, degree) - start
    assert phi.degree_dims(d) == blocks
    assert phi.out_dim(d) == total
    assert _features(phi, np.ones((N, d))).shape == (N, total)


def test_dimensions_of_digest_table():
    """I-23 against the digest's table (§3.2), independently of the formulas above."""
    table = {  # d: {p: (concatenated tensor, d^p, monomials)}
        32: {2: (1_057, 1_024, 561)},
        48: {2: (2_353, 2_304, 1_225)},
        64: {2: (4_161, 4_096, 2_145), 3: (266_305, 262_144, 47_905)},
        96: {2: (9_313, 9_216, 4_753)},
        128: {2: (16_513, 16_384, 8_385)},
        256: {2: (None, 65_536, 33_153)},
    }
    for d, rows in table.items():
        for p, (concatenated, pure, monomials) in rows.items():
            tensor = fm.Polynomial(p, form="tensor")
            if concatenated is not None:
                assert tensor.out_dim(d) == concatenated
            assert tensor.degree_dims(d)[-1] == pure
            assert fm.Polynomial(p).out_dim(d) == monomials
            assert fm.TaylorExp(p).out_dim(d) == monomials


MAPS: dict[str, Callable[[int], fm.AbstractFeatureMap]] = {
    "identity": lambda d: fm.Identity(),
    "monomial": lambda d: fm.Polynomial(3),
    "monomial-no-constant": lambda d: fm.Polynomial(2, include_constant=False),
    "tensor": lambda d: fm.Polynomial(3, form="tensor"),
    "tensor-no-constant": lambda d: fm.Polynomial(2, form="tensor", include_constant=False),
    "elementwise": lambda d: fm.Elementwise(3),
    "elementwise-constant": lambda d: fm.Elementwise(2, include_constant=True),
    "taylor": lambda d: fm.TaylorExp(2, temperature=0.7),
    "random": lambda d: fm.RandomFeatures(d, RF_FEATURES, key=jr.key(d)),
}


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("d", [1, 3])
def test_out_dim_matches_output(name, d):
    """I-23 for every map: out_dim(d) is the last dimension of phi(x), for any batch shape;
    the input's floating dtype is kept."""
    phi = MAPS[name](d)
    for batch, dtype in [((), jnp.float64), ((N,), jnp.float32), ((2, 3), jnp.float64)]:
        out = jax.eval_shape(phi, jax.ShapeDtypeStruct(batch + (d,), dtype))
        assert out.shape == batch + (phi.out_dim(d),)
        assert out.dtype == dtype


@pytest.mark.parametrize("degree_and_dim", [(3, 1), (2, 2), (2, 3), (3, 2)])
def test_monomial_features_have_full_rank(degree_and_dim):
    """ATLAS Prop 2, testable form (digest §3.4): for generic keys the monomial feature matrix
    has rank C(d+p, p) = out_dim, so no monomial feature is redundant; the tensor form has the
    same rank, below its dimension where it repeats mixed monomials."""
    degree, d = degree_and_dim
    D = math.comb(d + degree, degree)
    keys = np.random.default_rng(d * 10 + degree).normal(size=(D + 4, d))
    monomial = fm.Polynomial(degree)
    tensor = fm.Polynomial(degree, form="tensor")
    assert np.linalg.matrix_rank(_features(monomial, keys)) == D == monomial.out_dim(d)
    assert np.linalg.matrix_rank(_features(tensor, keys)) == D
    assert (tensor.out_dim(d) > D) == (d >= 2)


# ---------------------------------------------------------------------------------------------
# I-24, I-25: p = 1


@given(form=FORMS, d=DIMS, data=st.data())
def test_degree_one_is_identity_plus_bias(form, d, data):
    """I-24: p = 1, a = (1, 1) gives phi(x) = [1; x], the constant first (also by default),
    so a linear memory on phi is the affine map W[:, 0] + W[:, 1:] x."""
    X = _array(data, (N, d))
    expected = np.concatenate([np.ones((N, 1)), X], axis=-1)
    for phi in (fm.Polynomial(1, form=form), fm.Polynomial(1, form=form, coefficients=(1, 1))):
        np.testing.assert_allclose(_features(phi, X), expected, rtol=1e-15, atol=0)
    W = np.random.default_rng(d).normal(size=(3, d + 1))
    affine = W[:, 0] + X @ W[:, 1:].T
    np.testing.assert_allclose(expected @ W.T, affine, rtol=1e-12, atol=1e-12)


@given(form=FORMS, d=DIMS, data=st.data())
def test_degree_one_input_gating_limit(form, d, data):
    """I-25: p = 1, a = (a_0 -> 0, 1) gives [sqrt(a_0); x] -> [0; x] and the kernel q.k + a_0;
    without the constant it is exactly the identity."""
    X, Y = _array(data, (N, d)), _array(data, (N, d))
    a0 = 1e-30
    phi = fm.Polynomial(1, form=form, coefficients=(a0, 1.0))
    features = _features(phi, X)
    np.testing.assert_allclose(features[:, 1:], X, rtol=1e-15, atol=0)
    np.testing.assert_allclose(features[:, 0], math.sqrt(a0), rtol=1e-12)
    S = X @ Y.T
    assert np.all(np.abs(_gram(phi, X, Y) - (S + a0)) <= 1e-14 * (1 + np.abs(S)))

    gated = fm.Polynomial(1, form=form, include_constant=False, coefficients=(1.0,))
    np.testing.assert_allclose(_features(gated, X), _features(fm.Identity(), X), rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# I-26, I-27: the truncated exponential


# Digest §3.3: relative error of the degree-P truncation. Printed for s = -1.87, these are the
# values of s = -1.875 (at s = -1.87 they are 6.64, 0.934, 0.083 and 0.0042).
DIGEST_RELATIVE_ERRORS = {1: 6.7, 4: 0.95, 6: 0.085, 8: 0.0043}


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6, 8])
def test_truncated_exp_on_a_grid(order):
    """I-26 over s in [-60, 60] (d = 1, q = s, k = 1): even P is > 0 everywhere; odd P is
    negative at s = -3 (1 - 3 = -2 for P = 1; 1 - 3 + 4.5 - 4.5 = -2 for P = 3). Also the
    digest's relative errors at s = -1.875."""
    s = np.concatenate([np.linspace(-60.0, 60.0, 12_001), [-3.0, -1.875]])
    features = _features(fm.TaylorExp(order), np.append(s, 1.0)[:, None])  # one program
    K = features[:-1] @ features[-1]
    np.testing.assert_allclose(K, _closed_form(_taylor(range(order + 1)), range(order + 1), s))
    if order % 2 == 0:
        assert np.all(K > 0)
    else:
        assert K[-2] < 0
    if order in DIGEST_RELATIVE_ERRORS:
        printed = DIGEST_RELATIVE_ERRORS[order]
        relative = abs(K[-1] - math.exp(-1.875)) / math.exp(-1.875)
        assert round(relative, 1 - math.floor(math.log10(printed))) == printed


@given(
    order=st.sampled_from([2, 4]),
    d=st.sampled_from([1, 2, 3]),
    form=FORMS,
    data=st.data(),
)
def test_even_order_kernel_positive_for_large_inputs(order, d, form, data):
    """I-26 through the features, with large-magnitude q and k, for the Polynomial default."""
    X, Y = _array(data, (N, d), bound=8.0), _array(data, (N, d), bound=8.0)
    assert np.all(_gram(fm.Polynomial(order, form=form), X, Y) > 0)


@given(order_and_dim=ORDER_AND_DIM, seed=SEEDS, include_extremes=st.booleans())
def test_taylor_error_bound_with_normalised_inputs(order_and_dim, seed, include_extremes):
    """I-27: |q| = |k| = 1 gives |sum_{i<=P} s^i/i! - e^s| <= e/(P+1)!."""
    order, d = order_and_dim
    rng = np.random.default_rng(seed)
    Q, K = rng.normal(size=(N, d)), rng.normal(size=(N, d))
    if include_extremes:  # s = 1 and s = -1
        K[0], K[1] = Q[0], -Q[1]
    Q /= np.linalg.norm(Q, axis=-1, keepdims=True)
    K /= np.linalg.norm(K, axis=-1, keepdims=True)
    kernel = np.diag(_gram(fm.TaylorExp(order), Q, K))
    s = np.sum(Q * K, axis=-1)
    assert np.all(np.abs(kernel - np.exp(s)) <= math.e / math.factorial(order + 1) + 1e-13)


# ---------------------------------------------------------------------------------------------
# Gradients: the a_i are learnable (digest §3.5.3), and frozen when asked.


def _objective(phi, X, Q, K, W):
    """A scalar function of phi: a linear read-out plus the kernel of matching rows (with
    W = 0, the kernel alone)."""
    return jnp.sum(W * phi(X)) + jnp.sum(phi(Q) * phi(K))


@eqx.filter_jit
def _coefficient_gradient(phi, field: str, X, Q, K, W, h: float = 1e-6):
    """jax.grad of `_objective` with respect to the coefficient array `phi.<field>`, and its
    central finite differences (the 2n perturbed objectives are vmapped)."""
    where = lambda m: getattr(m, field)
    value = where(phi)
    at = lambda v: _objective(eqx.tree_at(where, phi, v), X, Q, K, W)
    steps = h * jnp.eye(value.shape[0], dtype=value.dtype)
    finite_differences = (jax.vmap(at)(value + steps) - jax.vmap(at)(value - steps)) / (2 * h)
    return where(eqx.filter_grad(_objective)(phi, X, Q, K, W)), finite_differences


@eqx.filter_jit
def _kernel_gradients(phi, Q, K):
    """The gradients of sum_rows <phi(q), phi(k)> with respect to phi and to Q."""

    def kernel(phi_and_q):
        phi, Q = phi_and_q
        return jnp.sum(phi(Q) * phi(K))

    return eqx.filter_grad(kernel)((phi, Q))


@given(form=FORMS, include_constant=st.booleans(), data=st.data())
def test_polynomial_coefficient_gradient(form, include_constant, data):
    """The a_i are learnable (digest §3.5.3): jax.grad through softplus(raw) equals central
    finite differences (float64), and the kernel's gradient is the analytic
    sum_rows s^i sigmoid(raw_i). One shape, (p, d) = (3, 2), keeps this to four programs."""
    degree, d = 3, 2
    a = _positive_coefficients(data, degree + include_constant)
    phi = fm.Polynomial(degree, form=form, include_constant=include_constant, coefficients=a)
    X, Q, K = (_array(data, (N, d), bound=1.5) for _ in range(3))
    W = _array(data, (N, phi.out_dim(d)))
    grad, fd = map(np.asarray, _coefficient_gradient(phi, "raw_coefficients", X, Q, K, W))
    kernel_grad, _ = map(np.asarray, _coefficient_gradient(phi, "raw_coefficients", X, Q, K, 0 * W))
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6)
    s = np.sum(Q * K, axis=-1)
    sigmoid = 1 / (1 + np.exp(-np.asarray(phi.raw_coefficients)))
    analytic = np.array([np.sum(s**i) for i in phi.degrees]) * sigmoid
    np.testing.assert_allclose(kernel_grad, analytic, rtol=1e-10, atol=1e-13)


@given(form=FORMS, learnable=st.booleans(), data=st.data())
def test_polynomial_input_gradient_and_frozen_coefficients(form, learnable, data):
    """d/dq <phi(q), phi(k)> = sum_i i a_i s^{i-1} k, with learnable coefficients or not; with
    learnable=False the coefficients' gradient is exactly zero, otherwise it is sum_rows s^i
    sigmoid(raw_i)."""
    degree, d = 3, 2
    Q, K = _array(data, (N, d)), _array(data, (N, d))
    phi = fm.Polynomial(degree, form=form, learnable=learnable)
    s = np.sum(Q * K, axis=-1, keepdims=True)
    a = _taylor(range(degree + 1))
    expected = sum(i * a[i] * s ** (i - 1) for i in range(1, degree + 1)) * K
    phi_grads, q_grad = _kernel_gradients(phi, Q, K)
    np.testing.assert_allclose(np.asarray(q_grad), expected, rtol=1e-10, atol=1e-12)
    coefficient_grad = np.asarray(phi_grads.raw_coefficients)
    sigmoid = 1 / (1 + np.exp(-np.asarray(phi.raw_coefficients)))
    analytic = np.array([np.sum(s**i) for i in phi.degrees]) * sigmoid if learnable else 0.0
    np.testing.assert_allclose(coefficient_grad, analytic, rtol=1e-10, atol=1e-13)
    if not learnable:
        assert np.all(coefficient_grad == 0)


# ---------------------------------------------------------------------------------------------
# Elementwise (digest A-2 (ii))


@given(
    degree_and_dim=DEGREE_AND_DIM,
    include_constant=st.booleans(),
    random_coefficients=st.booleans(),
    data=st.data(),
)
def test_elementwise_values(degree_and_dim, include_constant, random_coefficients, data):
    """phi(x) = sum_i a_i x^i element-wise, same dimension; a_i = 1/i! or any real a_i."""
    degree, d = degree_and_dim
    degrees = range(0 if include_constant else 1, degree + 1)
    n = len(degrees)
    if random_coefficients:
        a = np.array(data.draw(st.lists(_floats(3.0), min_size=n, max_size=n)))
        phi = fm.Elementwise(degree, include_constant=include_constant, coefficients=tuple(a))
    else:
        a = _taylor(degrees)
        phi = fm.Elementwise(degree, include_constant=include_constant)
    np.testing.assert_array_equal(np.asarray(phi.coefficients), a)
    X = _array(data, (N, d))
    out = _features(phi, X)
    assert out.shape == X.shape and phi.out_dim(d) == d
    scale = _closed_form(np.abs(a), degrees, np.abs(X))
    assert np.all(np.abs(out - _closed_form(a, degrees, X)) <= 1e-13 * scale)


@given(include_constant=st.booleans(), learnable=st.booleans(), data=st.data())
def test_elementwise_coefficient_gradient(include_constant, learnable, data):
    """d/da_i [sum W phi(X) + sum phi(Q) phi(K)] = sum W X^i + sum (Q^i phi(K) + phi(Q) K^i),
    equal to central finite differences; frozen coefficients get a zero gradient."""
    degree, d = 3, 2
    X, Q, K, W = (_array(data, (N, d)) for _ in range(4))
    phi = fm.Elementwise(degree, include_constant=include_constant, learnable=learnable)
    grad, fd = map(np.asarray, _coefficient_gradient(phi, "coefficients", X, Q, K, W))
    if learnable:
        phi_Q, phi_K = _features(phi, Q), _features(phi, K)
        analytic = [np.sum(W * X**i + Q**i * phi_K + phi_Q * K**i) for i in phi.degrees]
        np.testing.assert_allclose(grad, analytic, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6)
    else:
        assert np.all(grad == 0)


# ---------------------------------------------------------------------------------------------
# Random features (digest A-2 (iv))


@given(d=st.sampled_from([1, 3]), seed=SEEDS, data=st.data())
def test_random_features_positive(d, seed, data):
    phi = fm.RandomFeatures(d, RF_FEATURES, key=jr.key(seed))
    features = _features(phi, _array(data, (N, d), bound=3.0))
    assert features.shape == (N, RF_FEATURES)
    assert np.all(features > 0)


@given(d=st.sampled_from([1, 3]), seed=SEEDS, data=st.data())
def test_random_features_unbiased(d, seed, data):
    """E <phi(q), phi(k)> = exp(q.k): the m per-feature estimates m phi_j(q) phi_j(k) average
    to exp(q.k) within 5 standard errors, estimated from the same sample."""
    phi = fm.RandomFeatures(d, RF_FEATURES, key=jr.key(seed))
    Q, K = _array(data, (N, d), bound=0.5), _array(data, (N, d), bound=0.5)
    z = RF_FEATURES * _features(phi, Q) * _features(phi, K)  # (N, m)
    estimate = np.diag(_gram(phi, Q, K))
    np.testing.assert_allclose(estimate, z.mean(axis=-1), rtol=1e-12)
    standard_error = z.std(axis=-1, ddof=1) / math.sqrt(RF_FEATURES)
    exact = np.exp(np.sum(Q * K, axis=-1))
    assert np.all(np.abs(estimate - exact) <= 5 * standard_error + 1e-12)


def test_random_features_keys_and_fixed_weights():
    d = 3
    X = np.random.default_rng(0).normal(size=(N, d))
    a = fm.RandomFeatures(d, RF_FEATURES, key=jr.key(1))
    b = fm.RandomFeatures(d, RF_FEATURES, key=jr.key(2))
    again = fm.RandomFeatures(d, RF_FEATURES, key=jr.key(1))
    assert not np.allclose(_features(a, X), _features(b, X))
    np.testing.assert_array_equal(_features(a, X), _features(again, X))
    # The projection is fixed (zero gradient); the inputs still get one.
    phi_grads, x_grads = _kernel_gradients(a, X, X)
    assert np.all(np.asarray(phi_grads.weight) == 0)
    assert np.all(np.isfinite(np.asarray(x_grads))) and np.any(np.asarray(x_grads) != 0)
    with pytest.raises(ValueError, match="construction dimension"):
        a.out_dim(d + 1)
    with pytest.raises(ValueError, match="last dimension"):
        _phi(a, jnp.ones((N, d + 1)))


# ---------------------------------------------------------------------------------------------
# Batch dimensions, jit, vmap


@eqx.filter_jit
def _phi_vmapped(phi, x):
    return jax.vmap(jax.vmap(phi))(x)


@pytest.mark.parametrize(
    "name", ["identity", "monomial", "tensor-no-constant", "elementwise", "taylor", "random"]
)
def test_batch_dims_match_vmap(name):
    """phi on a (2, 3, d) array equals phi vmapped over both batch axes, and the (6, d) rows."""
    d = 3
    phi = MAPS[name](d)
    x = np.random.default_rng(7).normal(size=(2, 3, d))
    out = _features(phi, x)
    np.testing.assert_allclose(out, np.asarray(_phi_vmapped(phi, x)), rtol=1e-13, atol=0)
    rows = _features(phi, x.reshape(6, d)).reshape(2, 3, -1)
    np.testing.assert_allclose(out, rows, rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------
# Argument validation


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: fm.Polynomial(0), "`degree`"),
        (lambda: fm.Polynomial(2, form="kronecker"), "`form`"),
        (lambda: fm.Polynomial(2, coefficients=(1.0, 0.0, 1.0)), "`coefficients`.*> 0"),
        (lambda: fm.Polynomial(2, coefficients=(1.0, -1.0, 1.0)), "`coefficients`.*> 0"),
        (lambda: fm.Polynomial(2, coefficients=(1.0, 1.0)), r"`coefficients`.*\(3,\)"),
        (
            lambda: fm.Polynomial(2, include_constant=False, coefficients=(1.0, 1.0, 1.0)),
            r"`coefficients`.*\(2,\)",
        ),
        (lambda: fm.Polynomial(1, coefficients=(1.0, float("nan"))), "`coefficients`.*finite"),
        (lambda: fm.Polynomial(2).out_dim(0), "`d`"),
        (lambda: fm.Elementwise(0), "`degree`"),
        (lambda: fm.Elementwise(2, coefficients=(1.0,)), r"`coefficients`.*\(2,\)"),
        (lambda: fm.TaylorExp(0), "`order`"),
        (lambda: fm.TaylorExp(2, temperature=0.0), "`temperature`"),
        (lambda: fm.TaylorExp(2, temperature=-1.0), "`temperature`"),
        (lambda: fm.RandomFeatures(0, 4, key=jr.key(0)), "`d`"),
        (lambda: fm.RandomFeatures(3, 0, key=jr.key(0)), "`num_features`"),
        (lambda: fm.Identity().out_dim(0), "`d`"),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()

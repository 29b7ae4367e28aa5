r"""What every form of the Omega-rule scan takes: the per-token arrays and the static rule.

`omega_scan` validates its arguments, applies the feature map and builds one `ScanInputs` and
one `ScanRule`; the sequential oracle (`_sequential.py`), the chunk-parallel forms
(`_chunked.py`, `_exact_chunked.py`) and the Pallas kernels (`_pallas.py`) all take
`(state, inputs, rule)`, so that an option added to the rule reaches every path in one place.
"""

from collections.abc import Callable

import equinox as eqx
from jaxtyping import Array, Float, Scalar

import optimizers as iopt


class ScanInputs(eqx.Module):
    r"""The per-token arrays of one sequence, after the feature map (ATLAS Eqs 9-10, 32-33).

    - `features_q`, `features_k`: $\phi(q_t)$, $\phi(k_t)$, `(T, d_in)`; `v`: `(T, d_out)`.
    - `lr`: $\eta_t$; `decay`: $\alpha_t$; `momentum`: $\theta_t$ (zeros for learners
      without momentum); each `(T,)`.
    - `gamma`: the window gates, `(T,)` per written token or `(T, c)` per step and offset.
    """

    features_q: Float[Array, "T d_in"]
    features_k: Float[Array, "T d_in"]
    v: Float[Array, "T d_out"]
    lr: Float[Array, " T"]
    decay: Float[Array, " T"]
    momentum: Float[Array, " T"]
    gamma: Float[Array, " T"] | Float[Array, "T c"]


class ScanRule(eqx.Module):
    """The static options of one scan, as `omega_scan` documents them: the objective, the
    inner learner, the window $c$, the chunk size $b$ (part of the model), `decay_first`,
    `muon_per_chunk`, and the execution block of the exact form (a speed setting)."""

    objective: Callable[..., Scalar] = eqx.field(static=True)
    optimizer: iopt.InnerOptimizer = eqx.field(static=True)
    window: int = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    decay_first: bool = eqx.field(static=True, default=False)
    muon_per_chunk: bool = eqx.field(static=True, default=False)
    block_size: int | None = eqx.field(static=True, default=None)

"""Inner-loop learners for test-time memories, in the style of optax.

Every learner is a factory returning an `InnerOptimizer` (a NamedTuple of `init` / `update`)
whose `update` takes the per-token step size, retention and momentum as arguments.
"""

from ._inner import (
    apply_updates as apply_updates,
    describe as describe,
    EmptyState as EmptyState,
    from_optax as from_optax,
    gd as gd,
    InnerOptimizer as InnerOptimizer,
    linear_equivalent as linear_equivalent,
    LinearForm as LinearForm,
    momentum as momentum,
    MomentumState as MomentumState,
    muon as muon,
    no_precondition as no_precondition,
)
from ._newton_schulz import (
    CUBIC_COEFFICIENTS as CUBIC_COEFFICIENTS,
    JORDAN_COEFFICIENTS as JORDAN_COEFFICIENTS,
    newton_schulz as newton_schulz,
)

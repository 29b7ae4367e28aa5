"""ATLAS and its family of test-time memories, in pure JAX.

The one function every fast path is measured against is `omega_scan`.
"""

from ._memory import (
    AbstractMemory as AbstractMemory,
    GatedMLPMemory as GatedMLPMemory,
    LinearMemory as LinearMemory,
    MLPMemory as MLPMemory,
)
from ._model import (
    Block as Block,
    LanguageModel as LanguageModel,
    RMSNorm as RMSNorm,
    SwiGLU as SwiGLU,
)
from ._objective import dot as dot, huber as huber, l2 as l2, lp as lp
from ._param_count import (
    count_parameters as count_parameters,
    format_parameter_table as format_parameter_table,
    parameter_counts as parameter_counts,
)
from ._scan import omega_scan as omega_scan
from ._state import init_omega_state as init_omega_state, OmegaState as OmegaState

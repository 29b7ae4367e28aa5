"""ATLAS and its family of test-time memories, in pure JAX.

The one function every fast path is measured against is `omega_scan`.
"""

from . import presets as presets
from ._attention import (
    AttentionLayer as AttentionLayer,
    AttentionState as AttentionState,
    causal_attention as causal_attention,
    rope as rope,
)
from ._diagnostics import (
    diagnose_scan as diagnose_scan,
    DivergenceReport as DivergenceReport,
)
from ._hybrid import (
    HybridState as HybridState,
    MAGLayer as MAGLayer,
    MALLayer as MALLayer,
)
from ._import_path import (
    is_import_path as is_import_path,
    resolve_import_path as resolve_import_path,
)
from ._kernel import (
    init_kernel_memory_state as init_kernel_memory_state,
    kernel_memory_scan as kernel_memory_scan,
    kernel_memory_stream as kernel_memory_stream,
    KernelMemoryState as KernelMemoryState,
)
from ._layer import (
    MemoryFactory as MemoryFactory,
    MemoryInputs as MemoryInputs,
    MemoryLayer as MemoryLayer,
    MemoryLayerConfig as MemoryLayerConfig,
    MemoryLayerState as MemoryLayerState,
    Objective as Objective,
)
from ._memory import (
    AbstractMemory as AbstractMemory,
    GatedMLPMemory as GatedMLPMemory,
    gauss_newton_curvature as gauss_newton_curvature,
    LinearMemory as LinearMemory,
    MLPMemory as MLPMemory,
    sampled_curvature as sampled_curvature,
)
from ._mixer import AbstractMixer as AbstractMixer
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
from ._sharding import (
    batch_sharding as batch_sharding,
    check_batch as check_batch,
    constrain as constrain,
    make_mesh as make_mesh,
    MESH_AXES as MESH_AXES,
    optimizer_state_shardings as optimizer_state_shardings,
    parameter_shardings as parameter_shardings,
    parameter_specs as parameter_specs,
    parse_mesh as parse_mesh,
    shard as shard,
)
from ._state import init_omega_state as init_omega_state, OmegaState as OmegaState

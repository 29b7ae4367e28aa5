import gc
import os
import pathlib


# XLA's CPU runtime runs independent operations of one program at once on its thread pool,
# one thread per core unless PJRT_NPROC says otherwise. A batched triangular solve large enough
# (the exact-chunked DeltaNet form) hands its matrices to that same pool and blocks until they
# are done: two such solves at once on a pool of two block both threads with their work still
# queued, and the process waits forever (jaxlib 0.10.2; `test_layer_properties` hung this way
# on two cores, in `lapack_dtrsm_ffi` -> `ParallelBatchMap` -> `BlockingCounter::Wait` on both
# pool threads). On a pool of one the solve runs its matrices itself. Tests run one process
# per core (pytest-xdist), so one thread each costs nothing. Set before JAX starts its backend.
os.environ.setdefault("PJRT_NPROC", "1")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


# Identities are checked in float64; tests that need float32 ask for it explicitly.
jax.config.update("jax_enable_x64", True)

# Every distinct shape compiles once; the persistent cache makes re-runs cheap. Only programs
# that take at least half a second to compile are stored (caching every small program, eager
# ops included, meant thousands of cache reads and writes per run).
_cache_dir = os.environ.get(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "atlas-eqx-xla")
)
jax.config.update("jax_compilation_cache_dir", _cache_dir)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Every compiled program stays mapped in memory while JAX's in-memory caches hold it, a few
# mappings each. One process running the whole suite reached Linux's limit of 65,530 mappings
# per process (vm.max_map_count) and crashed inside XLA, in compilation or in a cache read,
# at whichever test came next. Dropping the caches after each module, and whenever the count
# nears the limit, keeps it far below.
_MAPS = pathlib.Path("/proc/self/maps")
_MAX_MAPPINGS = 30_000


def _mappings() -> int:
    with _MAPS.open("rb") as maps:
        return sum(1 for _ in maps)


def _drop_compiled_programs() -> None:
    jax.effects_barrier()  # nothing still running may need a program about to be dropped
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_after_each_module():
    yield
    _drop_compiled_programs()


@pytest.fixture(autouse=True)
def _drop_compiled_programs_near_the_mapping_limit():
    yield
    if _MAPS.exists() and _mappings() > _MAX_MAPPINGS:
        _drop_compiled_programs()


settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    database=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

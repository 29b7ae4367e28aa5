import os
import pathlib

import jax
from hypothesis import HealthCheck, settings


# Identities are checked in float64; tests that need float32 ask for it explicitly.
jax.config.update("jax_enable_x64", True)

# Every distinct shape compiles once; the persistent cache makes re-runs cheap. Only programs
# that take at least half a second to compile are stored: caching every small program (eager
# ops included, thousands of entries) made full runs read and write the cache thousands of
# times, and several full runs segfaulted inside JAX's cache reads (jax 0.10.2, CPU).
_cache_dir = os.environ.get(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "atlas-eqx-xla")
)
jax.config.update("jax_compilation_cache_dir", _cache_dir)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

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

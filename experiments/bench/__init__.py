"""Benchmarks (`atlas-eqx bench`): the chunked scan against the sequential oracle, the exact
chunk-parallel form, our layers against titans-pytorch and fla, streaming inference,
FLOPs per token by part with the fraction of a matmul's speed reached, Newton-Schulz on its
own, and the matrix-product bound of the programs the speed targets are about.

Builds on `experiments.training`; nothing in `experiments` but the CLI imports it.
"""

from ._exact import ExactBenchConfig as ExactBenchConfig, run_exact_benchmark as run_exact_benchmark
from ._flops import count_flops as count_flops, FlopCount as FlopCount
from ._flops_bench import (
    FlopsBenchConfig as FlopsBenchConfig,
    run_flops_benchmark as run_flops_benchmark,
)
from ._matmul_bound import (
    MATMUL_BOUND_CASES as MATMUL_BOUND_CASES,
    MatmulBoundConfig as MatmulBoundConfig,
    run_matmul_bound_benchmark as run_matmul_bound_benchmark,
)
from ._newton_schulz_bench import (
    NewtonSchulzBenchConfig as NewtonSchulzBenchConfig,
    run_newton_schulz_benchmark as run_newton_schulz_benchmark,
)
from ._peer_packages import PeersMissing as PeersMissing
from ._peers import run_peers_benchmark as run_peers_benchmark
from ._peers_runs import PeersBenchConfig as PeersBenchConfig, QUICK_CONFIG as QUICK_CONFIG
from ._scan import run_scan_benchmark as run_scan_benchmark, ScanBenchConfig as ScanBenchConfig
from ._stream import (
    QUICK_STREAM_CONFIG as QUICK_STREAM_CONFIG,
    run_stream_benchmark as run_stream_benchmark,
    StreamBenchConfig as StreamBenchConfig,
    TEN_MILLION as TEN_MILLION,
)

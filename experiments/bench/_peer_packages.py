"""The peer packages of `bench peers` and `bench exact`: their pinned versions, the check that
they are installed, and fla's plain-torch naive references (loaded without triton)."""

import importlib.util
import pathlib
import types
from collections.abc import Callable
from typing import Any


TORCH_VERSION = "2.13.0"
TITANS_VERSION = "0.5.5"
FLA_CORE_VERSION = "0.5.2"
INSTALL_HINT = (
    "pip install 'atlas-eqx[bench]'  (or by hand: pip install torch==2.13.0 "
    "titans-pytorch==0.5.5 fla-core==0.5.2; on a CPU-only machine install the +cpu torch "
    "first, e.g. pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu: "
    "an unpinned torch pulls a CUDA build of several GB)"
)


class PeersMissing(RuntimeError):
    """torch or titans-pytorch is not installed; the message says what to install."""


def require_peers() -> tuple[Any, Any]:
    """Import torch and titans_pytorch, or raise `PeersMissing` naming the missing package and
    the install command."""
    modules = []
    for name in ("torch", "titans_pytorch"):  # torch first: titans-pytorch imports it
        try:
            modules.append(importlib.import_module(name))
        except ImportError as error:
            raise PeersMissing(
                f"atlas-eqx bench peers compares against titans-pytorch and needs torch and "
                f"titans-pytorch, which are not installed (missing: {name}). Install them "
                f"with: {INSTALL_HINT}"
            ) from error
    return modules[0], modules[1]


def load_fla_naive(ops_module: str) -> types.ModuleType | None:
    """fla-core's plain-torch reference file `fla/ops/<ops_module>/naive.py` (for example
    `delta_rule` or `gated_delta_rule`), loaded from the installed file without importing
    `fla.ops`, whose Triton kernels need `triton`. `None` if torch or fla-core is not
    installed."""
    if importlib.util.find_spec("torch") is None:
        return None
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / "ops" / ops_module / "naive.py"
        if path.is_file():
            module_spec = importlib.util.spec_from_file_location(f"_fla_{ops_module}_naive", path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
    return None


def load_fla_naive_delta_rule() -> Callable | None:
    """fla's own `delta_rule_recurrence` (`load_fla_naive("delta_rule")`), or `None`."""
    module = load_fla_naive("delta_rule")
    return None if module is None else module.delta_rule_recurrence

"""Where a compiled JAX function's time goes, by kind of XLA operation: one `jax.profiler` trace
of a few calls, each operation's exclusive time (its own duration less that of the operations
it encloses, such as a `while` loop's body), summed by kind.

The kinds are read from the names XLA:CPU gives its thunks (an operation is named after its
HLO opcode or, for a fusion, the opcodes it fuses):

- `matrix products`: dots and convolutions, alone or in a fusion XLA hands to its matrix
  library (`dot*`, `convolution*`, `ynn_fusion*`, `*dot*` fusions);
- `data movement`: copies, transposes, concatenations, slices, pads, gathers, scatters,
  broadcasts and dynamic updates, alone or fused only with one another;
- `loops and calls`: the exclusive time of `while`, `conditional` and `call` thunks (the loop
  control itself, its body being counted in its own operations);
- `element-wise and reductions`: every other fusion or operation.

The name rules suit XLA:CPU's thunk runtime; on other backends the trace names differ and the
split falls back to `element-wise and reductions`.
"""

import collections
import glob
import gzip
import json
import re
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import jax


KINDS = ("matrix products", "data movement", "loops and calls", "element-wise and reductions")
_MOVEMENT = {
    "copy",
    "transpose",
    "concatenate",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "pad",
    "gather",
    "scatter",
    "broadcast",
    "bitcast",
    "reshape",
    "reverse",
    "wrapped",
    "select",
    "iota",
}
_LOOPS = {"while", "conditional", "call"}
_RUNTIME_PREFIXES = (
    "$",
    "Thunk",
    "Slinky",
    "PjitFunction",
    "CommonPjRt",
    "Pjit",
    "end: ",  # the runtime's marker at the end of an operation, named after it
    "ThreadpoolListener",
)


def operation_kind(name: str) -> str | None:
    """The kind (one of `KINDS`) of the XLA:CPU operation called `name`, or None for events of
    the runtime rather than of the program (Python frames, executors, thread pools)."""
    if name.startswith(_RUNTIME_PREFIXES):
        return None
    base = re.sub(r"\.\d+$", "", name)
    words = [word for word in base.split("_") if word != "fusion"]
    if base.startswith("ynn_fusion") or {"dot", "convolution"} & set(words):
        return "matrix products"
    if base in _LOOPS:
        return "loops and calls"
    if words and all(word in _MOVEMENT for word in words):
        return "data movement"
    return "element-wise and reductions"


def exclusive_times(events: Iterable[dict[str, Any]]) -> collections.Counter[str]:
    """Each complete event's duration less the durations of the events it encloses on the same
    thread, summed by name (microseconds)."""
    by_thread: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for event in events:
        if event.get("ph") == "X" and "dur" in event:
            by_thread[(event.get("pid"), event.get("tid"))].append(event)
    totals: collections.Counter[str] = collections.Counter()
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list[Any]] = []  # [end, name, exclusive]
        for event in thread:
            start, duration = event["ts"], event["dur"]
            while stack and stack[-1][0] <= start:
                _, done_name, done_time = stack.pop()
                totals[done_name] += done_time
            if stack:
                stack[-1][2] -= duration
            stack.append([start + duration, event["name"], duration])
        for _, name, time in stack:
            totals[name] += time
    return totals


def time_by_kind(function: Callable[[], Any], calls: int = 3) -> dict[str, float]:
    """The share of `function`'s operation time in each of `KINDS` over `calls` traced calls
    (call it once before, so that compilation is not traced). `function` runs the program and
    waits for its result."""
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        try:
            for _ in range(calls):
                function()
        finally:
            jax.profiler.stop_trace()
        (path,) = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as trace:
            events = json.load(trace)["traceEvents"]
    seconds: dict[str, float] = {kind: 0.0 for kind in KINDS}
    for name, microseconds in exclusive_times(events).items():
        kind = operation_kind(name)
        if kind is not None:
            seconds[kind] += max(microseconds, 0) / 1e6
    total = sum(seconds.values())
    return {kind: seconds[kind] / total if total else 0.0 for kind in KINDS}

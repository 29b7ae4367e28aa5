"""Training across processes: `jax.distributed` set-up, the coordinator address, barriers and
gathering global arrays to the host for a checkpoint.

Every process runs the same program on the same run directory. Process 0 writes it (config,
metrics, checkpoints); every process reads the checkpoint it resumes from. On CPU the
processes' collectives run over gloo; on GPU and TPU JAX's default collectives are used.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import PyTree


def parse_coordinator(address: str) -> tuple[str, int]:
    """`(host, port)` of a coordinator address `HOST:PORT` (an IPv6 host in brackets,
    `[::1]:1234`). Raises `ValueError` naming what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(
            f"expected HOST:PORT, e.g. 127.0.0.1:12355 or node0:12355; got {address!r}"
        )
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"the port of {address!r} must be an integer; got {port!r}") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"the port of {address!r} must lie in [1, 65535]; got {number}")
    return host, number


_initialized: tuple[int, int, str] | None = None


def initialize_processes(num_processes: int, process_id: int, coordinator: str) -> None:
    """Join a job of `num_processes` processes as process `process_id`, coordinated at
    `coordinator` (`HOST:PORT`; process 0 serves it), with `jax.distributed.initialize`.
    Nothing happens for one process. Must run before any JAX computation in this process;
    calling it again with the same arguments does nothing."""
    global _initialized
    if num_processes == 1:
        return
    wanted = (num_processes, process_id, coordinator)
    if _initialized is not None:
        if _initialized != wanted:
            raise ValueError(
                f"this process already joined a job as {_initialized}; it cannot join another "
                f"as {wanted} (num_processes, process_id, coordinator)"
            )
        return
    # Only the CPU backend reads this option: it makes CPU devices of different processes
    # reach each other (GPU and TPU keep JAX's default collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    except RuntimeError as error:
        raise ValueError(f"jax.distributed.initialize failed: {error}") from None
    _initialized = wanted


def is_primary() -> bool:
    """Whether this is process 0, the one that writes the run directory."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_same_everywhere(value: int, what: str) -> None:
    """Raise `ValueError` on every process unless all processes hold the same `value`
    (`what` names it in the message)."""
    if jax.process_count() == 1:
        return
    values = np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int64)))
    if not np.all(values == values[0]):
        raise ValueError(
            f"the processes disagree on {what}: {values.tolist()} (process 0, 1, ...); every "
            "process must see the same run directory (a shared filesystem, or a copy on each "
            "host)"
        )


def to_host(tree: PyTree) -> PyTree:
    """`tree` with every array that spans several processes replaced by its whole value as a
    NumPy array (other leaves unchanged). A collective: every process must call it."""
    leaves, treedef = jax.tree.flatten(tree)
    spread = [
        i
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
    ]
    if spread:
        arrays = [leaves[i] for i in spread]
        replicated = []
        for array in arrays:
            if not isinstance(array.sharding, NamedSharding):
                raise TypeError(f"to_host: expected a NamedSharding; got {array.sharding}")
            replicated.append(NamedSharding(array.sharding.mesh, PartitionSpec()))
        gathered = jax.jit(lambda xs: xs, out_shardings=replicated)(arrays)
        for i, array in zip(spread, gathered, strict=True):
            leaves[i] = np.asarray(array.addressable_data(0))
    return jax.tree.unflatten(treedef, leaves)

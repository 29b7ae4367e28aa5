"""`atlas-eqx launch -n N train ...`: a job of N processes on this machine.

Each child is `python -m experiments train ... --num-processes N --process-id i --coordinator
127.0.0.1:<free port>`; their output lines come back prefixed with `[i] `. The first child to
fail stops the others and gives the launcher its exit status.
"""

import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO


_PROCESS_FLAGS = ("--num-processes", "--process-id", "--coordinator")
_GRACE_SECONDS = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _relay(stream: IO[str], prefix: str, sink: IO[str], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sink.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            sink.flush()
    stream.close()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def launch(commands: Sequence[Sequence[str]], env: Mapping[str, str] | None = None) -> int:
    """Run every command of `commands` as a child process at once, relaying its stdout and
    stderr line by line with the prefix `[i] `. Returns 0 when all exit with 0; as soon as
    one fails, the others are terminated (killed after a grace period) and its exit status
    is returned (1 for a child ended by a signal)."""
    lock = threading.Lock()
    children: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    try:
        for index, command in enumerate(commands):
            child = subprocess.Popen(
                list(command),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                bufsize=1,
                env=None if env is None else dict(env),
            )
            children.append(child)
            for stream, sink in ((child.stdout, sys.stdout), (child.stderr, sys.stderr)):
                assert stream is not None
                relay = threading.Thread(
                    target=_relay, args=(stream, f"[{index}] ", sink, lock), daemon=True
                )
                relay.start()
                relays.append(relay)
        status = 0
        while status == 0:
            codes = [child.poll() for child in children]
            failed = [(index, code) for index, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                index, code = failed[0]
                status = code if code > 0 else 1
                if None in codes:
                    with lock:
                        print(
                            f"atlas-eqx launch: process {index} exited with status {code}; "
                            "stopping the others",
                            file=sys.stderr,
                            flush=True,
                        )
            elif all(code == 0 for code in codes):
                break
            else:
                time.sleep(0.05)
    except KeyboardInterrupt:
        status = 130
    finally:
        for child in children:
            _stop(child)
        for relay in relays:
            relay.join(timeout=_GRACE_SECONDS)
    return status


def launch_local(num_processes: int, child_args: Sequence[str], *, debug: bool = False) -> int:
    """`atlas-eqx launch -n num_processes <child_args>`: run `atlas-eqx <child_args>` as
    `num_processes` processes joined at a free port of 127.0.0.1 (`launch`). Only `train`
    runs across processes; the process flags are the launcher's to set."""
    if num_processes < 1:
        raise SystemExit(f"atlas-eqx launch: -n must be >= 1; got {num_processes}")
    if not child_args:
        raise SystemExit("atlas-eqx launch: name the subcommand to run, e.g. launch -n 2 train")
    if child_args[0] != "train":
        raise SystemExit(
            f"atlas-eqx launch: only `train` runs across processes; got {child_args[0]!r}"
        )
    given = [
        flag
        for flag in _PROCESS_FLAGS
        if any(a == flag or a.startswith(flag + "=") for a in child_args)
    ]
    if given:
        raise SystemExit(
            f"atlas-eqx launch: the launcher sets {', '.join(given)} itself; drop it from the "
            "train flags (to place processes yourself, run `atlas-eqx train` with the flags "
            "in each process)"
        )
    coordinator = f"127.0.0.1:{free_port()}"
    commands = [
        [sys.executable, "-m", "experiments", *child_args]
        + ["--num-processes", str(num_processes), "--process-id", str(index)]
        + ["--coordinator", coordinator]
        + (["--debug"] if debug else [])
        for index in range(num_processes)
    ]
    # The children import this package from where the launcher found it.
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return launch(commands, env)

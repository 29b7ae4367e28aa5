"""Run by `test_sharding.py` in a subprocess with 8 fake CPU devices; prints one JSON object.

For each preset and mesh: the loss and gradients of `batch_loss` with the batch split over
`"data"` and the heads over `"heads"`, against the same computation on one device; one full
training step (AdamW) against the single-device step; and the shardings of the parameters,
the optimizer state and the batch after the step. float64 throughout.
"""

import json
import os
import sys
from typing import Any, cast

import jax


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)
if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # as tests/conftest.py: re-runs skip compiling
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import atlas_eqx as ae  # noqa: E402
from experiments.training._train import (  # noqa: E402
    batch_loss,
    make_optimizer,
    make_train_step,
    OptimConfig,
    shard_batch,
    shard_training_state,
)


VOCAB, T, B = 32, 8, 8
OPTIONS: dict[str, dict[str, Any]] = {
    "atlas": dict(chunk_size=2, window=2),
    "transformer": {},
}
MESHES = {
    "atlas": ("data=4,heads=2",),
    "transformer": ("data=4,heads=2", "data=2,heads=4", "data=8"),
}


def _model(preset: str) -> ae.LanguageModel:
    return ae.LanguageModel(
        VOCAB,
        16,
        1,
        4,
        key=jax.random.key(0),
        mixer=preset,
        mixer_options=OPTIONS[preset],
        mlp_hidden=24,
    )


def _batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (B, T + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


@eqx.filter_jit
def _loss_and_grads(model, inputs, targets):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_of(params):
        return batch_loss(eqx.combine(params, static), inputs, targets)[0]

    return jax.value_and_grad(loss_of)(params)


def _max_diff(a: Any, b: Any) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y)))) for x, y in pairs)


def _max_abs(a: Any) -> float:
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a))


def _spec(x: Any) -> str:
    return str(x.sharding.spec)


def _placement(tree: Any, mesh: Any) -> dict[str, Any]:
    """Declared and actual specs of every leaf, and whether each actual sharding places the
    same slices on the same devices as the declared one."""
    leaves = jax.tree.leaves(tree)
    declared = jax.tree.leaves(ae.parameter_shardings(tree, mesh))
    return dict(
        actual=[_spec(x) for x in leaves],
        declared=[str(s.spec) for s in declared],
        equivalent=[
            bool(x.sharding.is_equivalent_to(s, x.ndim))
            for x, s in zip(leaves, declared, strict=True)
        ],
        sharded_over_heads=sum("heads" in str(s.spec) for s in declared),
    )


def _atlas_program(inputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Shapes and collectives in the compiled loss and gradients of `atlas` on data=4,heads=2:
    whether the stacked memory weights appear at their full (4 heads) or per-device (2 heads)
    shape."""
    import re

    model = _model("atlas")
    mesh = ae.make_mesh("data=4,heads=2")
    sharded = ae.shard(model, ae.parameter_shardings(model, mesh))
    x, y = shard_batch((inputs, targets), mesh)
    compiled: Any = cast(Any, _loss_and_grads).lower(sharded, x, y).compile()
    text = compiled.compiled.as_text()
    mixer: Any = model.blocks[0].mixer
    weight = jax.tree.leaves(mixer.memory)[0]  # (4, hidden, features)
    full = "f64[" + ",".join(map(str, weight.shape)) + "]"
    shard = "f64[" + ",".join(map(str, (weight.shape[0] // 2, *weight.shape[1:]))) + "]"
    return dict(
        full_shape_in_program=full in text,
        shard_shape_in_program=shard in text,
        collectives={
            op: len(re.findall(op + r"\(", text))
            for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute")
        },
    )


def _cli_runs() -> dict[str, Any]:
    """`atlas-eqx train` with and without `--mesh data=4,heads=2`, and a run interrupted on
    one mesh (data=8) and resumed from its checkpoint on another (data=2,heads=4): the final
    evaluations."""
    import contextlib
    import dataclasses
    import io
    import tempfile

    from experiments.cli import build_parser, main as cli
    from experiments.training._config import config_from_args
    from experiments.training._run import run_training, TrainConfig

    flags = "--preset transformer --d-model 16 --n-heads 4 --n-layers 1 --num-train 256 "
    flags += "--num-test 32 --batch-size 8 --steps 4 --eval-every 0 --checkpoint-every 2 "
    flags += "--no-progress"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("single", ""), ("mesh", "--mesh data=4,heads=2")):
            with contextlib.redirect_stdout(io.StringIO()):
                cli(["train", *f"{flags} {extra} --out-dir {tmp}/{name}".split()])
            with open(f"{tmp}/{name}/eval.json") as file:
                results[name] = json.load(file)
        args = build_parser().parse_args(["train", *f"{flags} --out-dir {tmp}/r".split()])
        config = config_from_args(TrainConfig, args)
        run_training(dataclasses.replace(config, mesh="data=8"), progress=False, stop_after=2)
        results["resumed"] = run_training(
            dataclasses.replace(config, mesh="data=2,heads=4"), progress=False
        )
    return results


def main() -> None:
    inputs, targets = _batch()
    optim = OptimConfig(lr=1e-2, warmup_steps=0)
    optimizer = make_optimizer(optim, 10)
    out: dict[str, Any] = dict(devices=jax.device_count(), runs=[])
    for preset in OPTIONS:
        model = _model(preset)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        loss1, grads1 = _loss_and_grads(model, jnp.asarray(inputs), jnp.asarray(targets))
        model1, state1, _ = make_train_step(optim, 10)(
            model, opt_state, jnp.asarray(inputs), jnp.asarray(targets)
        )
        for spec in MESHES[preset]:
            mesh = ae.make_mesh(spec)
            m, s = shard_training_state(model, opt_state, optimizer, mesh)
            x, y = shard_batch((inputs, targets), mesh)
            loss, grads = _loss_and_grads(m, x, y)
            m2, s2, _ = make_train_step(optim, 10, mesh)(m, s, x, y)
            params2 = eqx.filter(m2, eqx.is_inexact_array)
            mixer = m2.blocks[0].mixer
            if preset == "atlas":
                q_proj, out_proj = mixer.q_proj, mixer.out_proj
                memory_leaf = jax.tree.leaves(mixer.memory)[0]
            else:
                q_proj, out_proj = mixer.wq.weight, mixer.wo.weight
                memory_leaf = q_proj
            adam: Any = cast(Any, s2).inner_state[1][0]  # chain(clip, adamw): its ScaleByAdamState
            out["runs"].append(
                dict(
                    preset=preset,
                    mesh=spec,
                    loss_single=float(loss1),
                    loss_diff=abs(float(loss) - float(loss1)),
                    grad_diff=_max_diff(grads, grads1),
                    grad_scale=_max_abs(grads1),
                    step_param_diff=_max_diff(params2, eqx.filter(model1, eqx.is_inexact_array)),
                    step_state_diff=_max_diff(s2, state1),
                    params=_placement(params2, mesh),
                    mu=_placement(adam.mu, mesh),
                    nu=_placement(adam.nu, mesh),
                    count_spec=_spec(adam.count),
                    q_proj=dict(
                        spec=_spec(q_proj),
                        shape=list(q_proj.shape),
                        shard=list(q_proj.addressable_shards[0].data.shape),
                    ),
                    out_proj=dict(
                        spec=_spec(out_proj),
                        shard=list(out_proj.addressable_shards[0].data.shape),
                    ),
                    memory_leaf=dict(
                        spec=_spec(memory_leaf),
                        shape=list(memory_leaf.shape),
                        shard=list(memory_leaf.addressable_shards[0].data.shape),
                    ),
                    embedding_spec=_spec(m2.embedding),
                    batch=dict(spec=_spec(x), shard=list(x.addressable_shards[0].data.shape)),
                )
            )
    try:
        ae.make_mesh("data=3,heads=2")
    except ValueError as error:
        out["bad_product"] = str(error)
    try:
        ae.parameter_shardings(_model("atlas"), ae.make_mesh("data=1,heads=8"))
    except ValueError as error:
        out["bad_heads"] = str(error)
    out["atlas_program"] = _atlas_program(inputs, targets)
    out["cli"] = _cli_runs()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

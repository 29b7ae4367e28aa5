"""Training and streaming: the outer training loop, `atlas-eqx train / eval`, the MQAR training
runs every recall study is built from, and memory-only streaming (`atlas-eqx stream`).

Builds on `experiments.tasks`; `experiments.bench` and `experiments.studies` build on it.
"""

from ._config import (
    add_config_arguments as add_config_arguments,
    config_from_args as config_from_args,
    save_config as save_config,
)
from ._recall import (
    layout_options as layout_options,
    mqar_batches as mqar_batches,
    mqar_eval_batches as mqar_eval_batches,
    RecallModelConfig as RecallModelConfig,
    RecallResult as RecallResult,
    RecallRunConfig as RecallRunConfig,
    RecallTaskConfig as RecallTaskConfig,
    run_recall as run_recall,
)
from ._run import (
    run_evaluation as run_evaluation,
    run_training as run_training,
    TrainConfig as TrainConfig,
    training_mesh as training_mesh,
)
from ._stream import stream_run as stream_run, StreamResult as StreamResult
from ._stream_data import StreamConfig as StreamConfig
from ._stream_sweep import stream_compare as stream_compare, stream_sweep as stream_sweep
from ._train import (
    Batch as Batch,
    CheckpointError as CheckpointError,
    evaluate as evaluate,
    load_checkpoint as load_checkpoint,
    make_optimizer as make_optimizer,
    make_train_step as make_train_step,
    OptimConfig as OptimConfig,
    save_checkpoint as save_checkpoint,
    train as train,
    TrainingDiverged as TrainingDiverged,
    TrainResult as TrainResult,
)

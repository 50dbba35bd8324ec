"""The data layer: OGBench files without the network, local generation, on-device chunked
sampling and a functional replay buffer. Independent of the rest of `qam`."""

from ._buffer import (
    Transition as Transition,
    add_transition as add_transition,
    empty_replay_buffer as empty_replay_buffer,
    online_transition as online_transition,
    replay_buffer_from_dataset as replay_buffer_from_dataset,
    sample_balanced as sample_balanced,
)
from ._dataset import (
    Dataset as Dataset,
    ReplayBuffer as ReplayBuffer,
    concatenate_datasets as concatenate_datasets,
    dataset_from_numpy as dataset_from_numpy,
)
from ._generate import (
    GENERATABLE_ENVS as GENERATABLE_ENVS,
    GeneratedDataset as GeneratedDataset,
    generate_dataset as generate_dataset,
)
from ._ogbench import (
    DatasetFileError as DatasetFileError,
    DatasetInfo as DatasetInfo,
    DatasetNotFoundError as DatasetNotFoundError,
    OGBenchData as OGBenchData,
    OGBenchName as OGBenchName,
    UnknownEnvironmentError as UnknownEnvironmentError,
    default_sparse as default_sparse,
    iter_ogbench_shards as iter_ogbench_shards,
    list_shards as list_shards,
    load_ogbench as load_ogbench,
    make_env as make_env,
    parse_env_name as parse_env_name,
    resolve_dataset_dir as resolve_dataset_dir,
)
from ._sampling import SequenceBatch as SequenceBatch, sample_sequence as sample_sequence

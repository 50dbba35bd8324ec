"""The data layer: OGBench files without the network, local generation, dense cube rewards,
on-device chunked sampling and a functional replay buffer. Independent of the rest of `qam`."""

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
from ._dense import (
    DENSE_REWARD_VERSIONS as DENSE_REWARD_VERSIONS,
    CubeState as CubeState,
    DenseRewardConfig as DenseRewardConfig,
    check_dense_reward_version as check_dense_reward_version,
    chunk_shaping as chunk_shaping,
    cube_state_from_observations as cube_state_from_observations,
    dense_reward as dense_reward,
    dense_reward_options as dense_reward_options,
    dense_reward_v1 as dense_reward_v1,
    dense_reward_v2 as dense_reward_v2,
    dense_reward_v3 as dense_reward_v3,
    dense_reward_v4 as dense_reward_v4,
    dense_reward_v5 as dense_reward_v5,
    dense_reward_v6 as dense_reward_v6,
    dense_reward_v7 as dense_reward_v7,
    dense_reward_v8 as dense_reward_v8,
    dense_reward_v9 as dense_reward_v9,
    relabel_dense as relabel_dense,
    task_goals as task_goals,
    wrap_dense_reward as wrap_dense_reward,
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
    ShardHeader as ShardHeader,
    UnknownEnvironmentError as UnknownEnvironmentError,
    default_sparse as default_sparse,
    inspect_ogbench_shards as inspect_ogbench_shards,
    iter_ogbench_shards as iter_ogbench_shards,
    list_shards as list_shards,
    load_ogbench as load_ogbench,
    load_ogbench_shard as load_ogbench_shard,
    make_env as make_env,
    parse_env_name as parse_env_name,
    resolve_dataset_dir as resolve_dataset_dir,
)
from ._sampling import SequenceBatch as SequenceBatch, sample_sequence as sample_sequence

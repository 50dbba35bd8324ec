"""Agents: each method is a module with a frozen config dataclass and pure `init`, `update`
and `act` functions (`update` is jit- and vmap-able)."""

from . import qam as qam
from ._common import (
    ChunkBatch as ChunkBatch,
    critic_loss as critic_loss,
    make_optimizer as make_optimizer,
    polyak_update as polyak_update,
)
from ._presets import DOMAINS as DOMAINS, METHOD_PRESETS as METHOD_PRESETS, domain_of as domain_of
from .qam import QAMConfig as QAMConfig, QAMState as QAMState

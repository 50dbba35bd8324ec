"""qam: Q-learning with Adjoint Matching in JAX + Equinox.

The core is a handful of stateless, single-example functions on Equinox modules (batch them with
`jax.vmap`). Time runs from 0 (noise) to 1 (action); velocity fields are called `v(t, x, obs)`.

- `memoryless_sde_sample`: one rollout of the memoryless SDE (reference discretisation).
- `lean_adjoint`: the backward lean-adjoint recursion through the base drift only.
- `basic_adjoint`: the exact discrete adjoint of the rollout (BAM; equals autodiff).
- `adjoint_matching_loss`: the adjoint matching regression for the fine-tuned velocity.
- `fused_adjoint_matching_loss`: rollout + lean adjoint + loss in one pass (for training);
  `fused_adjoint_matching_batch_loss`: the same for a batch, one batched terminal adjoint.
- `flow_matching_loss`, `ode_sample`: behaviour-cloning flows and deterministic sampling.
- `td_loss`: the ensemble TD loss with the pessimistic target `mean - rho * std`.
- `vp_beta_schedule`, `EpsilonNetwork`, `ddpm_noisy_action`, `ddpm_step`, `ddpm_sample`: a
  DDPM policy (variance-preserving schedule, noise predictor, training noising, the reverse
  samplers of QSM and DAC); its steps are indexed `n = 0 .. T`, not times in `[0, 1]`.

See Li et al., "Q-learning with Adjoint Matching", arXiv 2601.14234.
"""

from . import nn as nn
from ._adjoint import (
    adjoint_matching_loss as adjoint_matching_loss,
    basic_adjoint as basic_adjoint,
    fused_adjoint_matching_batch_loss as fused_adjoint_matching_batch_loss,
    fused_adjoint_matching_loss as fused_adjoint_matching_loss,
    lean_adjoint as lean_adjoint,
)
from ._ddpm import (
    DDPMSchedule as DDPMSchedule,
    EpsilonNetwork as EpsilonNetwork,
    ddpm_noisy_action as ddpm_noisy_action,
    ddpm_sample as ddpm_sample,
    ddpm_step as ddpm_step,
    vp_beta_schedule as vp_beta_schedule,
)
from ._flow import flow_matching_loss as flow_matching_loss, ode_sample as ode_sample
from ._sde import (
    SDETrajectory as SDETrajectory,
    memoryless_sde_sample as memoryless_sde_sample,
    memoryless_sigma as memoryless_sigma,
    time_grid as time_grid,
)
from ._td import TDAux as TDAux, pessimistic_value as pessimistic_value, td_loss as td_loss
from ._types import VelocityField as VelocityField


__version__ = "0.1.0"

"""Agents: every method is an `Agent` record of pure functions over one `AgentState` layout,
registered by name in `AGENTS`; the loss terms they assemble are public here too.

```
agent = qam.agents.AGENTS["qam-edit"]
config = agent.config(horizon=5)              # or agent.paper_config("cube-double-play-...")
state = agent.init(key, obs_example, action_example, config)
state, metrics = agent.update(state, batch, key=key)   # jit- and vmap-able
chunk = agent.act(state, obs, key=key)
```
"""

from . import (
    bam as bam,
    cgql as cgql,
    ddpm as ddpm,
    dsrl as dsrl,
    fawac as fawac,
    fbrac as fbrac,
    fedit as fedit,
    fql as fql,
    ifql as ifql,
    qam as qam,
    rebrac as rebrac,
    rlpd as rlpd,
)
from ._bptt import ode_bptt_term as ode_bptt_term, sde_bptt_term as sde_bptt_term
from ._common import (
    flat_chunk as flat_chunk,
    make_optimizer as make_optimizer,
    polyak_update as polyak_update,
)
from ._ddpm_terms import (
    critic_action_gradient as critic_action_gradient,
    ddpm_actor_term as ddpm_actor_term,
)
from ._guidance import (
    guided_ode_actions as guided_ode_actions,
    guided_ode_sample as guided_ode_sample,
    linex_loss as linex_loss,
    noisy_critic_term as noisy_critic_term,
    time_conditioned_q as time_conditioned_q,
    time_conditioned_q_batched as time_conditioned_q_batched,
)
from ._interface import (
    Agent as Agent,
    AgentConfig as AgentConfig,
    AgentState as AgentState,
    gradient_step as gradient_step,
    init_state as init_state,
)
from ._presets import (
    DOMAINS as DOMAINS,
    METHOD_PRESETS as METHOD_PRESETS,
    domain_of as domain_of,
    paper_settings as paper_settings,
)
from ._sac import latent_critic_term as latent_critic_term, sac_actor_term as sac_actor_term
from ._terms import (
    Aggregation as Aggregation,
    adjoint_matching_term as adjoint_matching_term,
    aggregate_q as aggregate_q,
    best_of_n as best_of_n,
    critic_term as critic_term,
    edit_actions as edit_actions,
    edit_policy_term as edit_policy_term,
    flow_term as flow_term,
    ode_actions as ode_actions,
    one_step_distillation_term as one_step_distillation_term,
    policy_critic_term as policy_critic_term,
    target_entropy as target_entropy,
    td_term as td_term,
    temperature_term as temperature_term,
)
from ._value import (
    ValueNetwork as ValueNetwork,
    advantage_weights as advantage_weights,
    expectile_value_term as expectile_value_term,
    value_regression_term as value_regression_term,
)
from .cgql import CGQLConfig as CGQLConfig, CGQLParams as CGQLParams
from .ddpm import DDPMConfig as DDPMConfig, DDPMParams as DDPMParams
from .dsrl import DSRLConfig as DSRLConfig, DSRLParams as DSRLParams
from .fawac import FAWACConfig as FAWACConfig, FAWACParams as FAWACParams
from .fedit import FEditConfig as FEditConfig, FEditParams as FEditParams
from .ifql import IFQLConfig as IFQLConfig, IFQLParams as IFQLParams
from .qam import QAMConfig as QAMConfig, QAMParams as QAMParams
from .rebrac import ReBRACConfig as ReBRACConfig, ReBRACParams as ReBRACParams
from .rlpd import (
    TUNED_BC_ALPHA as TUNED_BC_ALPHA,
    RLPDConfig as RLPDConfig,
    RLPDParams as RLPDParams,
    tuned_bc_alpha as tuned_bc_alpha,
)


AGENTS: dict[str, Agent] = {
    agent.name: agent
    for agent in (
        qam.QAM,
        qam.QAM_FQL,
        qam.QAM_EDIT,
        fbrac.AGENT,
        fql.AGENT,
        bam.AGENT,
        fawac.AGENT,
        ifql.AGENT,
        fedit.AGENT,
        dsrl.AGENT,
        rebrac.AGENT,
        cgql.CGQL,
        cgql.CGQL_MSE,
        cgql.CGQL_LINEX,
        rlpd.AGENT,
        ddpm.QSM,
        ddpm.DAC,
    )
}

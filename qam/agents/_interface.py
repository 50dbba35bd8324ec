"""The agent interface every method implements, and the one gradient step they all take.

An agent is a record of pure functions (the model is optax's `GradientTransformation`):

```
state = agent.init(key, obs_example, action_example, config)
state, metrics = agent.update(state, batch, key=key)   # one gradient step; jit/vmap-able
chunk = agent.act(state, obs, key=key)           # one observation -> flat chunk in [-1, 1]^D
chunk = agent.bc_act(state, obs, key=key)        # the behaviour-cloning policy, if any
```

Every state has the same layout (`AgentState`): the trainable modules in one pytree of the
agent's own (`params`), Polyak target copies of some of them by field name (`targets`), the
optimiser state, the update count and the static config. `gradient_step` is the only place a
parameter changes: the agent hands it a loss of the trainable modules and gets back the state
after one clipped-or-plain Adam step and the Polyak update of every target from the
*pre-update* parameters.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from ..data import SequenceBatch
from ..nn import MLP, CriticEnsemble, VelocityNetwork
from ._common import make_optimizer, polyak_update


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """What every method shares; each method's config subclasses it and adds its own fields.

    The defaults are the reference's: 4 x 512 GELU networks, 10 critics, chunks of 5, Adam at
    3e-4, Polyak rate 0.005. Per-domain values are applied by `Agent.paper_config`.
    """

    learning_rate: float = 3e-4  # Adam learning rate, one optimiser for every module
    clip_grad: bool = False  # clip the concatenated gradient to global norm 1.0 before Adam
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)  # widths of every policy network
    critic_hidden: tuple[int, ...] = (512, 512, 512, 512)  # widths of critics and values
    actor_layer_norm: bool = False  # LayerNorm after each hidden activation of the policies
    critic_layer_norm: bool = True  # LayerNorm after each hidden activation of the critics
    layer_norm_eps: float = 1e-6  # every LayerNorm's epsilon (flax's default, as the reference)
    num_qs: int = 10  # critic ensemble size E
    horizon: int = 5  # action chunk length H (also the n of the n-step TD target)
    action_chunking: bool = True  # critic and policy see the whole chunk (flattened)
    discount: float = 0.99  # gamma; the TD target bootstraps with gamma^H
    rho: float = 0.5  # pessimism: the TD target uses mean_e Q' - rho * std_e Q'
    tau: float = 0.005  # Polyak rate of every target network

    def __post_init__(self):
        for name, ok, expected in self._checks():
            if not ok:
                raise ValueError(
                    f"`{type(self).__name__}({name}=...)` must be {expected}; got "
                    f"{getattr(self, name)!r}."
                )

    def _checks(self) -> list[tuple[str, bool, str]]:
        """`(field, holds, what was expected)` for every constraint; subclasses extend it."""
        finite = math.isfinite
        return [
            ("learning_rate", self.learning_rate > 0 and finite(self.learning_rate), "> 0"),
            ("actor_hidden", len(self.actor_hidden) >= 1 and min(self.actor_hidden) >= 1,
             "at least one layer, every width >= 1"),
            ("critic_hidden", len(self.critic_hidden) >= 1 and min(self.critic_hidden) >= 1,
             "at least one layer, every width >= 1"),
            ("layer_norm_eps", self.layer_norm_eps >= 0, ">= 0"),
            ("num_qs", self.num_qs >= 1, ">= 1"),
            ("horizon", self.horizon >= 1, ">= 1"),
            ("discount", 0.0 <= self.discount <= 1.0, "in [0, 1]"),
            ("rho", self.rho >= 0 and finite(self.rho), ">= 0"),
            ("tau", 0.0 < self.tau <= 1.0, "in (0, 1]"),
        ]  # fmt: skip

    def chunk_dim(self, action_dim: int) -> int:
        """`D`, the flat action dimension the policies and critics see."""
        return action_dim * (self.horizon if self.action_chunking else 1)

    def dims(self, obs_example: Array, action_example: Array) -> tuple[int, int]:
        """`(obs_dim, D)` for one flat observation and one flat action like the examples;
        raises `ValueError` for anything else (a batch, an image)."""
        if obs_example.ndim != 1 or action_example.ndim != 1:
            raise ValueError(
                "`init(obs_example=..., action_example=...)` must be one flat observation and "
                f"one flat action; got shapes {tuple(obs_example.shape)} and "
                f"{tuple(action_example.shape)}."
            )
        return obs_example.shape[0], self.chunk_dim(action_example.shape[0])

    def make_critic(self, obs_dim: int, action_dim: int, *, key: PRNGKeyArray) -> CriticEnsemble:
        """`num_qs` critics `Q_e(concat(s, a))` of widths `critic_hidden`."""
        return CriticEnsemble(
            obs_dim, action_dim, self.critic_hidden, num_critics=self.num_qs,
            layer_norm=self.critic_layer_norm, layer_norm_eps=self.layer_norm_eps, key=key,
        )  # fmt: skip

    def make_flow(self, obs_dim: int, action_dim: int, *, key: PRNGKeyArray) -> VelocityNetwork:
        """A velocity field `v(t, x, s)` of widths `actor_hidden`."""
        return VelocityNetwork(
            obs_dim, action_dim, self.actor_hidden, layer_norm=self.actor_layer_norm,
            layer_norm_eps=self.layer_norm_eps, key=key,
        )  # fmt: skip

    def make_mlp(self, in_size: int, out_size: int, *, key: PRNGKeyArray) -> MLP:
        """A policy MLP of widths `actor_hidden` (e.g. a one-step policy on `concat(s, z)`)."""
        return MLP(
            in_size, out_size, self.actor_hidden, layer_norm=self.actor_layer_norm,
            layer_norm_eps=self.layer_norm_eps, key=key,
        )  # fmt: skip


class AgentState(eqx.Module):
    """Everything an agent carries between updates (one layout for every method).

    - `params`: the trainable modules, one pytree (each agent defines its own small module
      class with a field per network, `None` where a configuration has no such network).
    - `targets`: Polyak copies of some of those fields, by field name (`{"critic": ...}`).
    - `opt_state`: the state of the one optimiser over every inexact leaf of `params`.
    - `step`: the number of updates taken.
    - `config`, `action_dim` (the flat chunk dimension `D`): static.
    """

    params: Any
    targets: dict[str, Any]
    opt_state: optax.OptState
    step: Array
    config: Any = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)


def init_state(
    params: Any, *, targets: tuple[str, ...], config: Any, action_dim: int
) -> AgentState:
    """A fresh `AgentState`: targets equal to their online fields, the optimiser of
    `config.learning_rate` / `config.clip_grad` initialised on `params`, step 0."""
    optimizer = make_optimizer(config.learning_rate, clip_grad=config.clip_grad)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(eqx.filter(params, eqx.is_inexact_array))
    return AgentState(
        params=params,
        targets={name: getattr(params, name) for name in targets},
        opt_state=opt_state,
        step=jnp.zeros((), jnp.int32),
        config=config,
        action_dim=action_dim,
    )


def gradient_step(
    state: AgentState,
    loss_fn: Callable[[Any], tuple[Float[Array, ""], dict[str, Array]]],
    *,
    target_period: int = 1,
) -> tuple[AgentState, dict[str, Array]]:
    """One step of every trainable module on `loss_fn(params) -> (loss, metrics)`.

    ```
    g = d loss / d params                   (inexact leaves only)
    params <- params + Adam(clip(g))        (clip to global norm 1 when config.clip_grad)
    target <- tau * params_pre + (1 - tau) * target   for every field in `targets`
    ```
    The targets move from the parameters *before* this step (as the reference) and only on
    updates `k = step + 1` with `k % target_period == 0` (ReBRAC: 2; everyone else: 1).
    Adds `grad_norm` (the global norm before clipping) to the metrics.
    """
    config = state.config
    dynamic, static = eqx.partition(state.params, eqx.is_inexact_array)
    grads, metrics = jax.grad(lambda d: loss_fn(eqx.combine(d, static)), has_aux=True)(dynamic)
    optimizer = make_optimizer(config.learning_rate, clip_grad=config.clip_grad)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
        updates, opt_state = optimizer.update(grads, state.opt_state, dynamic)
        params = eqx.combine(optax.apply_updates(dynamic, updates), static)
    targets = {}
    for name, target in state.targets.items():
        moved = polyak_update(target, getattr(state.params, name), tau=config.tau)
        if target_period > 1:
            moved = _where_tree((state.step + 1) % target_period == 0, moved, target)
        targets[name] = moved
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    new = AgentState(params, targets, opt_state, state.step + 1, config, state.action_dim)
    return new, metrics


def _where_tree(condition: Array, a: Any, b: Any) -> Any:
    """`a` where `condition` holds, else `b`, leaf by leaf over the inexact arrays."""
    a_arrays, static = eqx.partition(a, eqx.is_inexact_array)
    b_arrays = eqx.filter(b, eqx.is_inexact_array)
    chosen = jax.tree.map(lambda x, y: jnp.where(condition, x, y), a_arrays, b_arrays)
    return eqx.combine(chosen, static)


ActFn = Callable[..., Float[Array, " chunk"]]


class Agent(NamedTuple):
    """One method: its name, config class and pure functions (see the module docstring).

    - `init(key, obs_example, action_example, config) -> AgentState`
    - `update(state, batch, *, key) -> (state, metrics)`: one gradient step on a
      `qam.data.SequenceBatch`.
    - `act(state, obs, *, key)`: the deployed policy for one observation, the flat chunk
      (`H * A` numbers in `[-1, 1]`, executed open-loop). Stored parameters only.
    - `bc_act`: the behaviour-cloning policy the agent trains along (evaluated once beside it),
      or `None` for methods without one.
    - `defaults`: the config fields that make this method out of `config_class` (e.g. a
      variant name); `config(**overrides)` and `paper_config(env_name, **overrides)` apply them.
    - `run_defaults`: the `qam.train.RunConfig` fields the method's training regime needs
      (RLPD: `offline_steps=0, balanced_sampling=True, random_warmup=True`), which
      `examples/offline_to_online.py` applies unless a flag sets them; empty for most methods.
    """

    name: str
    config_class: type
    init: Callable[[PRNGKeyArray, Array, Array, Any], AgentState]
    update: Callable[..., tuple[AgentState, dict[str, Array]]]
    act: ActFn
    bc_act: ActFn | None = None
    defaults: Mapping[str, Any] = {}
    run_defaults: Mapping[str, Any] = {}

    def config(self, **overrides: Any) -> Any:
        """This method's config: the class defaults, then `defaults`, then `overrides`."""
        return self.config_class(**{**self.defaults, **overrides})

    def paper_config(self, env_name: str, **overrides: Any) -> Any:
        """The paper's configuration of this method on the domain of `env_name`: the shared
        per-domain settings (H, gamma, rho), then the method's tuned values, then
        `overrides`."""
        from ._presets import paper_settings

        return self.config(**{**paper_settings(self.name, env_name), **overrides})


def check_batch(batch: SequenceBatch, state: AgentState) -> None:
    """Raise `ValueError` (at trace time) if `batch`'s chunk length or action size does not
    match the agent's config."""
    config = state.config
    h = batch.actions.shape[1]
    if h != config.horizon:
        raise ValueError(
            f"`update(batch=...)`: the batch's chunks have {h} steps but the agent's "
            f"`horizon` is {config.horizon}; sample with `horizon={config.horizon}`."
        )
    if config.chunk_dim(batch.actions.shape[2]) != state.action_dim:
        raise ValueError(
            f"`update(batch=...)`: actions of size {batch.actions.shape[2]} do not match the "
            f"agent's flat chunk dimension {state.action_dim}."
        )

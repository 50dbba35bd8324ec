"""Every registered agent honours the interface: jit and vmap over seeds, determinism for a
key, finite metrics, chunks in the box, every trainable network trained, Polyak targets from
the pre-update parameters, a behaviour-cloning policy where declared, and a checkpoint round
trip. Agents are added to `qam.agents.AGENTS` and are covered here without a new test."""

import dataclasses
import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_chunk_batch

from qam.agents import AGENTS, AgentState


OBS, A, H, B, SEEDS = 4, 2, 2, 6, 2
# Tiny settings, applied where the agent's config has the field.
TINY = dict(
    actor_hidden=(8, 8), critic_hidden=(8, 8), num_qs=2, horizon=H, flow_steps=2,
    diffusion_steps=3, num_samples=3,
)  # fmt: skip


def _config(name):
    agent = AGENTS[name]
    fields = {f.name for f in dataclasses.fields(agent.config_class)}
    return agent.config(**{k: v for k, v in TINY.items() if k in fields})


def _batch(key):
    batch = random_chunk_batch(key, batch=B, horizon=H, obs_dim=OBS, action_dim=A)
    return batch._replace(valid=batch.valid.at[0, -1].set(0.0))


def _leaves(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))


@pytest.fixture(scope="module", params=sorted(AGENTS))
def trained(request):
    """Per agent: seeds' initial states, one vmapped jitted update, and what it returned."""
    name = request.param
    agent, config = AGENTS[name], _config(name)
    seed_keys = jax.random.split(jax.random.PRNGKey(0), SEEDS)
    init = jax.vmap(lambda k: agent.init(k, jnp.zeros(OBS), jnp.zeros(A), config))
    states = eqx.filter_jit(init)(seed_keys)
    batches = jax.vmap(_batch)(jax.random.split(jax.random.PRNGKey(1), SEEDS))
    update_keys = jax.random.split(jax.random.PRNGKey(2), SEEDS)
    update = eqx.filter_jit(eqx.filter_vmap(lambda s, b, k: agent.update(s, b, key=k)))
    new, metrics = update(states, batches, update_keys)
    again, _ = update(states, batches, update_keys)
    return dict(name=name, agent=agent, config=config, states=states, new=new,
                again=again, metrics=metrics, batches=batches)  # fmt: skip


def test_state_layout_and_step(trained):
    new = trained["new"]
    assert isinstance(new, AgentState)
    assert new.action_dim == H * A
    np.testing.assert_array_equal(new.step, np.ones(SEEDS, np.int32))
    assert set(new.targets) <= {f.name for f in dataclasses.fields(new.params)}


def test_update_is_deterministic_and_finite(trained):
    for x, y in zip(_leaves(trained["new"]), _leaves(trained["again"])):
        np.testing.assert_array_equal(x, y)
    assert trained["metrics"], "an update reports metrics"
    for name, value in trained["metrics"].items():
        assert value.shape == (SEEDS,), name
        assert bool(jnp.all(jnp.isfinite(value))), name
    assert "grad_norm" in trained["metrics"]


def test_every_trainable_network_moves(trained):
    states, new = trained["states"], trained["new"]
    for field in dataclasses.fields(states.params):
        before, after = getattr(states.params, field.name), getattr(new.params, field.name)
        if before is None:
            continue
        moved = any(not np.array_equal(x, y) for x, y in zip(_leaves(before), _leaves(after)))
        assert moved, f"{trained['name']}: `{field.name}` is trainable but no loss moved it"


def test_targets_move_from_the_pre_update_parameters(trained):
    # At step 1 each target equals its online network, so the first Polyak step leaves it
    # there: tau * online_pre + (1 - tau) * target_pre = online_pre (up to rounding).
    states, new, tau = trained["states"], trained["new"], trained["config"].tau
    for name, target in new.targets.items():
        online_pre = getattr(states.params, name)
        for t, o, t0 in zip(_leaves(target), _leaves(online_pre), _leaves(states.targets[name])):
            np.testing.assert_allclose(t, tau * o + (1 - tau) * t0, rtol=1e-6, atol=1e-7)


def test_act_and_bc_act_give_chunks_in_the_box(trained):
    agent, new = trained["agent"], trained["new"]
    obs = 5.0 * jax.random.normal(jax.random.PRNGKey(3), (SEEDS, OBS))
    keys = jax.random.split(jax.random.PRNGKey(4), SEEDS)
    policies = [agent.act] + ([agent.bc_act] if agent.bc_act is not None else [])
    for policy in policies:
        act = eqx.filter_jit(eqx.filter_vmap(lambda s, o, k, p=policy: p(s, o, key=k)))
        chunks = act(new, obs, keys)
        assert chunks.shape == (SEEDS, H * A)
        assert bool(jnp.all(jnp.isfinite(chunks)))
        assert bool(jnp.all(jnp.abs(chunks) <= 1.0))
        np.testing.assert_array_equal(chunks, act(new, obs, keys))


def test_checkpoint_round_trip(trained):
    new = trained["new"]
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, new)
    buffer.seek(0)
    like = jax.tree.map(jnp.zeros_like, new)
    loaded = eqx.tree_deserialise_leaves(buffer, like)
    for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(x, y)


def test_wrong_batch_is_refused(trained):
    agent, config = trained["agent"], trained["config"]
    state = agent.init(jax.random.PRNGKey(0), jnp.zeros(OBS), jnp.zeros(A), config)
    wrong = random_chunk_batch(jax.random.PRNGKey(1), batch=B, horizon=H + 1, obs_dim=OBS,
                               action_dim=A)  # fmt: skip
    with pytest.raises(ValueError, match="horizon"):
        agent.update(state, wrong, key=jax.random.PRNGKey(2))

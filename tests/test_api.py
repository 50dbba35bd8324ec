"""The public surface: every function under jit and vmap, no retracing, documented names."""

import functools
import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qam


OBS, D, K, B = 3, 4, 5, 6


@pytest.fixture
def nets(getkey):
    fine = qam.nn.VelocityNetwork(OBS, D, (16,), key=getkey())
    base = qam.nn.VelocityNetwork(OBS, D, (16,), key=getkey())
    return fine, base


def _am_pipeline(fine, base, obs, key):
    traj = qam.memoryless_sde_sample(fine, base, obs, key=key, action_dim=D, num_steps=K)
    adjoint = qam.lean_adjoint(base, obs, traj, -traj.action)
    basic = qam.basic_adjoint(fine, base, obs, traj, -traj.action)
    loss = qam.adjoint_matching_loss(fine, base, obs, traj, adjoint)
    flow = qam.flow_matching_loss(base, obs, traj.action, key=key)
    action = qam.ode_sample(fine, obs, key=key, action_dim=D, num_steps=K)
    td, _ = qam.td_loss(adjoint[0], loss, jnp.asarray(0.9), basic[0])
    return traj.xs, adjoint, basic, loss, flow, action, td


@pytest.mark.parametrize("transform", ["plain", "jit", "vmap"])
def test_every_public_function_under_jit_and_vmap(nets, getkey, transform):
    fine, base = nets
    obs = jax.random.normal(getkey(), (B, OBS))
    keys = jax.random.split(getkey(), B)
    reference = [_am_pipeline(fine, base, obs[b], keys[b]) for b in range(B)]
    reference = jax.tree.map(lambda *xs: jnp.stack(xs), *reference)
    run = functools.partial(_am_pipeline, fine, base)
    if transform == "jit":
        out = [jax.jit(run)(obs[b], keys[b]) for b in range(B)]
        out = jax.tree.map(lambda *xs: jnp.stack(xs), *out)
    elif transform == "vmap":
        out = jax.vmap(run)(obs, keys)
    else:
        out = reference
    for got, want in zip(out, reference):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_no_recompilation_between_calls_with_same_shapes(nets, getkey):
    fine, base = nets
    traces = 0

    @eqx.filter_jit
    def am_grad(fine, base, obs, key):
        nonlocal traces
        traces += 1
        keys = jax.random.split(key, obs.shape[0])
        sample = functools.partial(qam.memoryless_sde_sample, action_dim=D, num_steps=K)
        trajs = jax.vmap(lambda o, k: sample(fine, base, o, key=k))(obs, keys)
        trajs = jax.lax.stop_gradient(trajs)
        adjoints = jax.vmap(lambda o, tr: qam.lean_adjoint(base, o, tr, -tr.action))(obs, trajs)

        def loss(model):
            per = jax.vmap(lambda o, tr, a: qam.adjoint_matching_loss(model, base, o, tr, a))
            return jnp.mean(per(obs, trajs, adjoints))

        return eqx.filter_value_and_grad(loss)(fine)

    for _ in range(3):
        obs = jax.random.normal(getkey(), (B, OBS))
        loss, _ = am_grad(fine, base, obs, getkey())
        assert bool(jnp.isfinite(loss))
    # New parameter values, same shapes: still one trace.
    fine2 = jax.tree.map(lambda x: x + 1.0 if eqx.is_inexact_array(x) else x, fine)
    am_grad(fine2, base, obs, getkey())
    assert traces == 1


PUBLIC = [
    "memoryless_sde_sample", "lean_adjoint", "basic_adjoint", "adjoint_matching_loss",
    "flow_matching_loss", "ode_sample", "td_loss", "pessimistic_value", "memoryless_sigma",
    "time_grid", "SDETrajectory", "TDAux", "VelocityField",
]  # fmt: skip


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_are_documented(name):
    obj = getattr(qam, name)
    doc = inspect.getdoc(obj)
    assert doc and len(doc) > 60, f"qam.{name} needs a docstring"


def test_docstrings_state_time_direction_and_sign_conventions():
    assert "noise" in inspect.getdoc(qam.memoryless_sde_sample)
    assert "-inv_temp * dQ/da" in inspect.getdoc(qam.lean_adjoint)
    assert "stop_gradient" in inspect.getdoc(qam.adjoint_matching_loss)
    module_doc = inspect.getdoc(qam)
    assert module_doc is not None and "0 (noise) to 1 (action)" in module_doc


def test_keyword_only_hyperparameters():
    for fn, names in [
        (qam.memoryless_sde_sample, ["key", "num_steps", "noise", "solver", "residual"]),
        (qam.ode_sample, ["key", "num_steps", "noise", "solver", "clip"]),
        (qam.flow_matching_loss, ["key"]),
        (qam.td_loss, ["rho"]),
        (qam.basic_adjoint, ["running_cost_scale", "residual"]),
        (qam.adjoint_matching_loss, ["residual"]),
    ]:
        params = inspect.signature(fn).parameters
        for name in names:
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn.__name__, name)

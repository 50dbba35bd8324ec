"""A small adjoint-matching training run tilts a Gaussian base by the predicted amount."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import discrete_mean_shift, gaussian_velocity

import qam


K = 10


class _Velocity(eqx.Module):
    mlp: qam.nn.MLP

    def __init__(self, key):
        self.mlp = qam.nn.MLP(2, 1, (64, 64), key=key)

    def __call__(self, t, x, obs):
        return self.mlp(jnp.concatenate([x, jnp.asarray(t, x.dtype)[None]]))


def _train(s2, inv_temp, *, key, steps=1500, batch=256):
    base = gaussian_velocity(0.0, s2)
    init_key, train_key = jax.random.split(key)
    fine = _Velocity(init_key)
    optimiser = optax.adam(3e-3)
    opt_state = optimiser.init(eqx.filter(fine, eqx.is_array))
    sample = functools.partial(qam.memoryless_sde_sample, action_dim=1, num_steps=K)
    # Linear Q(a) = a, so the terminal adjoint is -inv_temp everywhere (no clipping).
    terminal = jnp.full((1,), -inv_temp)

    def loss_fn(model, keys):
        trajs = jax.vmap(lambda k: sample(model, base, None, key=k))(keys)
        trajs = jax.lax.stop_gradient(trajs)
        adjoints = jax.vmap(lambda tr: qam.lean_adjoint(base, None, tr, terminal))(trajs)
        losses = jax.vmap(lambda tr, a: qam.adjoint_matching_loss(model, base, None, tr, a))(
            trajs, adjoints
        )
        return jnp.mean(losses)

    @eqx.filter_jit
    def run(model, opt_state, key):
        params, static = eqx.partition(model, eqx.is_array)

        def step(carry, k):
            params, opt_state = carry
            grads = jax.grad(lambda p: loss_fn(eqx.combine(p, static), jax.random.split(k, batch)))(
                params
            )
            updates, opt_state = optimiser.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, opt_state), _ = jax.lax.scan(
            step, (params, opt_state), jax.random.split(key, steps)
        )
        return eqx.combine(params, static)

    return run(fine, opt_state, train_key), base


@pytest.mark.standard_promotion
@pytest.mark.parametrize("s2", [1.0, 0.25])
def test_training_tilts_gaussian_by_discrete_prediction(getkey, s2):
    inv_temp = 1.0
    fine, base = _train(s2, inv_temp, key=getkey())
    noise = jax.random.normal(getkey(), (20_000, 1)) * 1.0
    sample = lambda v, z: qam.ode_sample(v, None, noise=z, num_steps=K, clip=False)
    x_fine = jax.vmap(lambda z: sample(fine, z))(noise)
    x_base = jax.vmap(lambda z: sample(base, z))(noise)
    shift = float(jnp.mean(x_fine - x_base))
    predicted = discrete_mean_shift(s2, inv_temp, K)
    assert abs(predicted - {1.0: 0.879, 0.25: 0.262}[s2]) < 1e-3  # docs/mathematics.md §6.3
    assert abs(shift - predicted) < 0.05, (shift, predicted)
    ratio = float(jnp.var(x_fine) / jnp.var(x_base))
    assert abs(ratio - 1.0) < 0.05, ratio

"""A small adjoint-matching training run tilts a Gaussian base by the predicted amount."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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


_OPTIMISER = optax.adam(3e-3)


# One compiled training loop for every parametrisation (the base's variance and the inverse
# temperature are arguments, not constants). The suite compiles with XLA's backend
# optimisation level 0 (tests/conftest.py) to keep compile times short; this loop runs 1,500
# steps, where that costs more than it saves, so it is compiled with the optimisations on.
@functools.partial(
    jax.jit,
    static_argnames=("static", "steps", "batch"),
    compiler_options={"xla_backend_optimization_level": 2},
)
def _run(params, opt_state, s2, inv_temp, key, *, static, steps, batch):
    base = gaussian_velocity(0.0, s2)
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

    def step(carry, k):
        params, opt_state = carry
        grads = jax.grad(lambda p: loss_fn(eqx.combine(p, static), jax.random.split(k, batch)))(
            params
        )
        updates, opt_state = _OPTIMISER.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))
    return params


def _train(s2, inv_temp, *, key, steps=1500, batch=256):
    init_key, train_key = jax.random.split(key)
    params, static = eqx.partition(_Velocity(init_key), eqx.is_array)
    opt_state = _OPTIMISER.init(params)
    params = _run(
        params, opt_state, jnp.asarray(s2), jnp.asarray(inv_temp), train_key,
        static=static, steps=steps, batch=batch,
    )  # fmt: skip
    return eqx.combine(params, static), gaussian_velocity(0.0, s2)


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
    # The tolerances bound the trained network's error (the optimum is reached only up to
    # training, fixed keys); the Monte Carlo part of the estimate, from paired samples, is
    # checked to be far smaller, so the tolerance is not spent on sampling noise.
    standard_error = float(jnp.std(x_fine - x_base)) / np.sqrt(noise.shape[0])
    assert standard_error < 0.005, standard_error
    assert abs(shift - predicted) < 0.05, (shift, predicted)
    ratio = float(jnp.var(x_fine) / jnp.var(x_base))
    # Relative standard error of a variance ratio of 20,000 samples: <= 2 sqrt(2 / n) = 0.02.
    assert abs(ratio - 1.0) < 0.05, ratio

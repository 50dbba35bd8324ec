"""Quickstart: tilt a 2-D behaviour policy toward a known Q with adjoint matching.

QAM fine-tunes a flow policy so that it samples from the behaviour policy tilted by the critic,

    pi*(a) ∝ pi_B(a) exp(λ Q(a)),

without ever evaluating a density. This script shows every step on a toy problem you can see:

1. behaviour actions from a mixture of two Gaussians in 2-D (no observation: `obs=None`);
2. a small flow `v(t, x, obs)` fitted to them with `qam.flow_matching_loss`;
3. a known linear critic `Q(a) = cᵀa`, for which the tilt has a closed form
   (docs/mathematics.md §6.1): component k moves to `μ_k + λ S_k c` and its weight to
   `π_k exp(λ cᵀμ_k + ½ λ² cᵀS_k c)` (normalised);
4. adjoint matching: memoryless-SDE rollouts, lean adjoints, and the regression of the
   fine-tuned velocity onto `v_B - (σ²/2) A`;
5. deterministic sampling with `qam.ode_sample` from the base and fine-tuned flows, with a table
   of the mode weights and means;
6. a scatter plot, saved as a PNG.

Run `python examples/quickstart.py --help`. It takes well under a minute on 2 CPU cores.
"""

import argparse
import io
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qam
from qam.logging import atomic_write_bytes


ACTION_DIM = 2
NUM_FLOW_STEPS = 10  # K: the flow/SDE steps, QAM's default
# The behaviour policy: an equal mixture of two isotropic Gaussians, well inside [-1, 1]^2.
MODE_MEANS = np.array([[-0.5, 0.0], [0.5, 0.0]])
MODE_STD = 0.15
MODE_WEIGHTS = np.array([0.5, 0.5])
# The critic Q(a) = cᵀa and the inverse temperature λ of the reward r(a) = λ Q(a).
Q_DIRECTION = np.array([1.0, 0.3])
INV_TEMP = 2.0


class Velocity(eqx.Module):
    """A velocity field `v(t, x, obs) = MLP(concat(x, t))` that ignores the observation."""

    mlp: qam.nn.MLP

    def __init__(self, *, key):
        self.mlp = qam.nn.MLP(ACTION_DIM + 1, ACTION_DIM, (64, 64, 64), key=key)

    def __call__(self, t, x, obs):
        del obs  # no observation in this toy problem
        t = jnp.asarray(t, dtype=x.dtype)
        return self.mlp(jnp.concatenate([x, t[None]]))


def q_value(action):
    """The known critic `Q(a) = cᵀa`."""
    return jnp.dot(jnp.asarray(Q_DIRECTION, dtype=action.dtype), action)


def sample_behaviour(key, num):
    """`num` actions from the Gaussian mixture, shape `(num, 2)`."""
    mode_key, noise_key = jax.random.split(key)
    means = jnp.asarray(MODE_MEANS, dtype=jnp.float32)
    modes = jax.random.choice(mode_key, len(MODE_WEIGHTS), (num,), p=jnp.asarray(MODE_WEIGHTS))
    return means[modes] + MODE_STD * jax.random.normal(noise_key, (num, ACTION_DIM))


def train(loss_fn, model, data_fn, *, steps, learning_rate, key):
    """Adam on `mean(loss_fn(model, batch))` for `steps` steps, all inside one jitted `lax.scan`.

    `data_fn(model, key)` returns the batch for one step (it may use the current model)."""
    optimiser = optax.adam(learning_rate)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(carry, step_key):
        params, opt_state = carry
        batch_key, loss_key = jax.random.split(step_key)
        batch = data_fn(eqx.combine(params, static), batch_key)
        loss, grads = jax.value_and_grad(
            lambda p: loss_fn(eqx.combine(p, static), batch, loss_key)
        )(params)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def run(params, key):
        carry = (params, optimiser.init(params))
        (params, _), losses = jax.lax.scan(step, carry, jax.random.split(key, steps))
        return params, losses

    params, losses = run(params, key)
    return eqx.combine(params, static), losses


def fit_behaviour_flow(actions, *, steps, key):
    """Step 2: behaviour cloning, `min E |v(t, x_t) - (x_1 - x_0)|²` on the linear path."""
    init_key, train_key = jax.random.split(key)

    def data_fn(model, key):  # a minibatch of 256 behaviour actions
        return actions[jax.random.randint(key, (256,), 0, actions.shape[0])]

    def loss_fn(velocity, batch, key):
        keys = jax.random.split(key, batch.shape[0])
        per_sample = jax.vmap(lambda a, k: qam.flow_matching_loss(velocity, None, a, key=k))
        return jnp.mean(per_sample(batch, keys))

    learning_rate = optax.cosine_decay_schedule(3e-3, steps, alpha=0.05)
    return train(loss_fn, Velocity(key=init_key), data_fn, steps=steps,
                 learning_rate=learning_rate, key=train_key)  # fmt: skip


def adjoint_matching(base, *, steps, key):
    """Step 4: fine-tune a copy of `base` toward `pi_B exp(λ Q)` by adjoint matching.

    Each step (all networks single-example, batched with `jax.vmap`):

    - roll out the memoryless SDE `dX = (2 v - X/t) dt + σ(t) dW`, σ² = 2(1-t)/t, with the
      current fine-tuned velocity (it has the same marginals as the ODE of the same velocity);
    - set the terminal adjoint `A_K = -λ ∇Q(X_K)` (the gradient of the cost `-λ Q`);
    - integrate the lean adjoint backwards through the *base* drift only (`qam.lean_adjoint`);
    - regress: `qam.adjoint_matching_loss` is `Σ_i |2 (v - v_B)/σ_i + σ_i A_i|²`, minimised by
      `v = v_B - (σ_i²/2) E[A_i | X_i]`, the velocity of the tilted flow.

    We start the fine-tuned velocity at the base (as the Adjoint Matching paper does; the QAM
    reference starts from a random network instead, which reaches the same fixed point)."""

    def data_fn(fine, key):  # rollouts and their adjoints; no gradient flows through these
        def rollout_and_adjoint(k):
            trajectory = qam.memoryless_sde_sample(
                fine, base, None, key=k, action_dim=ACTION_DIM, num_steps=NUM_FLOW_STEPS
            )
            terminal_adjoint = -INV_TEMP * jax.grad(q_value)(trajectory.action)
            return trajectory, qam.lean_adjoint(base, None, trajectory, terminal_adjoint)

        return jax.vmap(rollout_and_adjoint)(jax.random.split(key, 256))

    def loss_fn(fine, batch, key):
        del key
        trajectories, adjoints = batch
        per_sample = jax.vmap(lambda tr, a: qam.adjoint_matching_loss(fine, base, None, tr, a))
        return jnp.mean(per_sample(trajectories, adjoints))

    return train(loss_fn, base, data_fn, steps=steps, learning_rate=1e-3, key=key)


def sample_flow(velocity, key, num):
    """Step 5: `num` actions from the deterministic K-step Euler ODE (no clipping)."""
    sample = lambda k: qam.ode_sample(
        velocity, None, key=k, action_dim=ACTION_DIM, num_steps=NUM_FLOW_STEPS, clip=False
    )
    return np.asarray(jax.jit(jax.vmap(sample))(jax.random.split(key, num)))


def analytic_tilt():
    """The closed-form tilted mixture (docs/mathematics.md §6.1) for the linear Q: weights and
    means."""
    c, cov = Q_DIRECTION, MODE_STD**2 * np.eye(ACTION_DIM)
    logits = np.log(MODE_WEIGHTS) + INV_TEMP * MODE_MEANS @ c + 0.5 * INV_TEMP**2 * c @ cov @ c
    weights = np.exp(logits - logits.max())
    return weights / weights.sum(), MODE_MEANS + INV_TEMP * c @ cov


def mode_stats(actions):
    """Assign each action to the nearest behaviour mode; return the modes' weights and means."""
    distances = np.linalg.norm(actions[:, None, :] - MODE_MEANS[None, :, :], axis=-1)
    nearest = np.argmin(distances, axis=1)
    weights = np.array([np.mean(nearest == k) for k in range(len(MODE_MEANS))])
    means = np.array([actions[nearest == k].mean(axis=0) for k in range(len(MODE_MEANS))])
    return weights, means


def save_plot(path, base_actions, fine_actions, rows):
    """Step 6: base vs fine-tuned samples side by side, written atomically to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    tilted_means = rows["analytic tilt (predicted)"][1]
    panels = [("base flow", base_actions, rows["base flow (ODE)"][0], "tab:blue"),
              ("after adjoint matching", fine_actions, rows["fine-tuned flow (achieved)"][0],
               "tab:orange")]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (name, actions, weights, colour) in zip(axes, panels):
        ax.scatter(*actions.T, s=3, alpha=0.4, c=colour)
        ax.scatter(*MODE_MEANS.T, marker="x", s=60, c="k", label="behaviour means")
        ax.scatter(*tilted_means.T, marker="*", s=120, c="r", label="analytic tilted means")
        ax.annotate("", xytext=(-0.15, -0.6), xy=(0.15, -0.51), arrowprops=dict(arrowstyle="->"))
        ax.text(-0.05, -0.72, "∇Q")
        ax.set(xlim=(-1, 1), ylim=(-0.8, 0.8), aspect="equal",
               title=f"{name}: mode weights {weights[0]:.2f} / {weights[1]:.2f}")  # fmt: skip
    axes[0].legend(loc="upper left", fontsize=8)
    analytic = rows["analytic tilt (predicted)"][0]
    fig.suptitle(f"QAM quickstart: Q(a) = cᵀa, c = {_c()}, λ = {INV_TEMP}; "
                 f"analytic mode weights {analytic[0]:.2f} / {analytic[1]:.2f}")  # fmt: skip
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())  # readers never see a half-written PNG


def print_table(rows):
    print(f"{'':26s}  {'weight 1':>8s}  {'weight 2':>8s}  {'mean 1':>16s}  {'mean 2':>16s}")
    for name, (weights, means) in rows.items():
        cells = "  ".join(f"({m[0]:+.3f}, {m[1]:+.3f})" for m in means)
        print(f"{name:26s}  {weights[0]:8.3f}  {weights[1]:8.3f}  {cells}")


def _c() -> tuple:
    return tuple(Q_DIRECTION.tolist())


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("--steps", type=int, default=800, help="adjoint matching steps")
    parser.add_argument("--bc-steps", type=int, default=3000, help="behaviour-cloning steps")
    parser.add_argument("--samples", type=int, default=4000, help="samples for the table")
    parser.add_argument(
        "--out",
        default=os.path.join("runs", "quickstart", "quickstart.png"),
        help="output PNG path",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data_key, flow_key, am_key, sample_key = jax.random.split(jax.random.PRNGKey(args.seed), 4)

    behaviour = sample_behaviour(data_key, 20_000)  # step 1
    base, flow_losses = fit_behaviour_flow(behaviour, steps=args.bc_steps, key=flow_key)
    print(f"flow matching:    {args.bc_steps} steps, final loss {flow_losses[-100:].mean():.4f}")
    fine, am_losses = adjoint_matching(base, steps=args.steps, key=am_key)
    print(f"adjoint matching: {args.steps} steps, loss {am_losses[:100].mean():.3f} "
          f"-> {am_losses[-100:].mean():.3f}")  # fmt: skip

    # The same noise for both flows, so each fine-tuned sample is paired with a base sample.
    base_actions = sample_flow(base, sample_key, args.samples)
    fine_actions = sample_flow(fine, sample_key, args.samples)
    tilted_weights, tilted_means = analytic_tilt()
    rows = {
        "behaviour data": mode_stats(np.asarray(behaviour)),
        "base flow (ODE)": mode_stats(base_actions),
        "analytic tilt (predicted)": (tilted_weights, tilted_means),
        "fine-tuned flow (achieved)": mode_stats(fine_actions),
    }
    print(f"\nQ(a) = cᵀa with c = {_c()}, λ = {INV_TEMP}; modes by nearest mean:")
    print_table(rows)
    print(f"(With K = {NUM_FLOW_STEPS} flow steps the learned policy under-tilts relative to the "
          "analytic target, docs/mathematics.md §6.3;\n raise NUM_FLOW_STEPS to close the "
          "gap.)")  # fmt: skip

    save_plot(args.out, base_actions, fine_actions, rows)
    print(f"\nsaved {args.out}; elapsed {time.perf_counter() - start:.1f} s")
    return {name: {"weights": w, "means": m} for name, (w, m) in rows.items()}


if __name__ == "__main__":
    main()

"""The core functions name the argument for a wrong shape, also outside pytest (where the
jaxtyping hook that checks annotations during the suite is not installed)."""

import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, qam
    key = jax.random.PRNGKey(0)
    v = qam.nn.VelocityNetwork(3, 2, (8,), key=key)
    batch_obs, obs = jnp.zeros((4, 3)), jnp.zeros(3)
    cases = {
        "sde-batch": lambda: qam.memoryless_sde_sample(v, v, batch_obs, key=key, action_dim=2,
                                                       num_steps=3),
        "sde-dim": lambda: qam.memoryless_sde_sample(v, v, obs, key=key, action_dim=5,
                                                     num_steps=3),
        "ode-batch": lambda: qam.ode_sample(v, batch_obs, key=key, action_dim=2),
        "ode-dim": lambda: jax.jit(lambda o: qam.ode_sample(v, o, key=key, action_dim=5))(obs),
        "flow-dim": lambda: qam.flow_matching_loss(v, obs, jnp.zeros(5), key=key),
        "fused-batch": lambda: qam.fused_adjoint_matching_loss(
            v, v, batch_obs, lambda a: a, key=key, action_dim=2, num_steps=3),
        "batch-dim": lambda: qam.fused_adjoint_matching_batch_loss(
            v, v, batch_obs, lambda a: a, key=key, action_dim=5, num_steps=3),
        "lean-batch": lambda: qam.lean_adjoint(
            v, batch_obs, qam.memoryless_sde_sample(v, v, obs, key=key, action_dim=2,
                                                    num_steps=3), jnp.zeros(2)),
    }
    for name, call in cases.items():
        try:
            call()
            print(name, "accepted")
        except ValueError as error:
            print(name, str(error).splitlines()[0])
    """
)

EXPECTED = {
    "sde-batch": "`memoryless_sde_sample(..., velocity=...)` cannot be evaluated on one "
    "observation of shape (4, 3) and one action of shape (2,)",
    "sde-dim": "`memoryless_sde_sample(..., velocity=...)` cannot be evaluated on one observation "
    "of shape (3,) and one action of shape (5,)",
    "ode-batch": "`ode_sample(..., velocity=...)` cannot be evaluated on one observation of "
    "shape (4, 3)",
    "ode-dim": "`ode_sample(..., velocity=...)` cannot be evaluated on one observation of shape "
    "(3,) and one action of shape (5,)",
    "flow-dim": "`flow_matching_loss(..., velocity=...)` cannot be evaluated",
    "fused-batch": "`fused_adjoint_matching_loss(..., velocity=...)` cannot be evaluated on one "
    "observation of shape (4, 3)",
    "batch-dim": "`fused_adjoint_matching_batch_loss(..., velocity=...)` cannot be evaluated on "
    "one observation of shape (3,) and one action of shape (5,)",
    "lean-batch": "`lean_adjoint(..., base_velocity=...)` cannot be evaluated on one observation "
    "of shape (4, 3)",
}


def test_wrong_shapes_are_named_outside_pytest():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=300, check=True).stdout  # fmt: skip
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert set(lines) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        assert lines[name].startswith(expected), (name, lines[name])

"""Single-example Equinox modules used by the QAM agents.

Every module works on one example (flat 1-D arrays); batch with `jax.vmap`. Dense layers use
Xavier-uniform weights and zero biases, and GELU (tanh approximation) activations, as the
reference implementation does.
"""

import functools
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray


def _xavier_linear(in_size: int, out_size: int, *, key: PRNGKeyArray) -> eqx.nn.Linear:
    limit = jnp.sqrt(6.0 / (in_size + out_size))
    weight = jax.random.uniform(key, (out_size, in_size), minval=-limit, maxval=limit)
    linear = eqx.nn.Linear(in_size, out_size, key=key)
    return eqx.tree_at(lambda m: (m.weight, m.bias), linear, (weight, jnp.zeros((out_size,))))


#: The default LayerNorm epsilon: flax's `nn.LayerNorm` default, which the reference networks use
#: (equinox's `eqx.nn.LayerNorm` defaults to 1e-5).
DEFAULT_LAYER_NORM_EPS = 1e-6


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _layer_norm(
    x: Float[Array, " features"],
    weight: Float[Array, " features"],
    bias: Float[Array, " features"],
    eps: float,
) -> Float[Array, " features"]:
    centred = x - jnp.mean(x)
    normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred) + eps)
    return normed * weight + bias


@_layer_norm.defjvp
def _layer_norm_jvp(eps, primals, tangents):
    x, weight, bias = primals
    dx, dweight, dbias = tangents
    centred = x - jnp.mean(x)
    inv_std = jax.lax.rsqrt(jnp.mean(centred * centred) + eps)
    normed = centred * inv_std
    # d(normed) = inv_std * (dx - mean(dx) - normed * mean(normed * dx)): linear in dx, so its
    # transpose (the backward pass) is the same two-reduction expression.
    dnormed = inv_std * (dx - jnp.mean(dx) - normed * jnp.mean(normed * dx))
    return normed * weight + bias, dnormed * weight + normed * dweight + dbias


class LayerNorm(eqx.Module):
    """Layer normalisation of one feature vector, with a hand-written backward pass.

    `y = weight * (x - mean(x)) / sqrt(var(x) + eps) + bias` (biased variance over the `n`
    features), as `eqx.nn.LayerNorm(n, eps=eps)`, whose parameters (`weight`, `bias`) and values
    it shares. The backward pass is the closed form
    `dx = (g - mean(g) - x_hat * mean(g * x_hat)) / sqrt(var(x) + eps)` with `g = weight * dy`
    and `x_hat` the normalised input, `dweight = dy * x_hat`, `dbias = dy` (the transpose of a
    hand-written JVP, so forward mode and higher derivatives work too): two reductions instead
    of the chain autodiff builds through the mean and variance, which makes the 10-critic
    ensemble's gradients 15-30% faster on CPU.

    **Arguments:**

    - `size`: the number of features `n`.
    - `eps`: added to the variance; default `1e-6`, flax's `nn.LayerNorm` default and so the
        reference critic's (equinox's default is `1e-5`). It matters only for features of small
        variance: the output changes by a relative `~(1e-5 - 1e-6) / (2 var(x))`.
    """

    weight: Float[Array, " features"]
    bias: Float[Array, " features"]
    eps: float = eqx.field(static=True)

    def __init__(self, size: int, eps: float = DEFAULT_LAYER_NORM_EPS):
        if not eps >= 0:
            raise ValueError(f"`LayerNorm(eps=...)` must be >= 0; got {eps!r}.")
        self.weight = jnp.ones((size,))
        self.bias = jnp.zeros((size,))
        self.eps = float(eps)

    def __call__(self, x: Float[Array, " features"]) -> Float[Array, " features"]:
        return _layer_norm(x, self.weight, self.bias, self.eps)


def mish(x: Array) -> Array:
    """`mish(x) = x * tanh(softplus(x))`, the activation of the DDPM epsilon network."""
    return x * jnp.tanh(jax.nn.softplus(x))


class MLP(eqx.Module):
    """A multilayer perceptron on one flat input.

    `Linear -> GELU [-> LayerNorm]` for each hidden layer, then a final `Linear` (followed by
    the activation, and LayerNorm, only if `activate_final`). Xavier-uniform weights, zero
    biases.

    **Arguments:**

    - `in_size`, `out_size`: input and output sizes.
    - `hidden_sizes`: the hidden widths, e.g. `(512, 512, 512, 512)`.
    - `layer_norm`: LayerNorm after each hidden activation (the reference critic uses it).
    - `layer_norm_eps`: the LayerNorms' epsilon (default `1e-6`, flax's, as the reference).
    - `activate_final`: apply the activation (and LayerNorm) after the last layer too.
    - `activation`: defaults to `jax.nn.gelu` (tanh approximation).
    - `key`: a PRNG key.
    """

    layers: tuple[eqx.nn.Linear, ...]
    norms: tuple[LayerNorm, ...] | None
    activation: Callable[[Array], Array] = eqx.field(static=True)
    activate_final: bool = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        hidden_sizes: Sequence[int],
        *,
        layer_norm: bool = False,
        layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS,
        activate_final: bool = False,
        activation: Callable[[Array], Array] = jax.nn.gelu,
        key: PRNGKeyArray,
    ):
        sizes = [in_size, *hidden_sizes, out_size]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            _xavier_linear(i, o, key=k) for i, o, k in zip(sizes[:-1], sizes[1:], keys)
        )
        num_norms = len(hidden_sizes) + (1 if activate_final else 0)
        self.norms = (
            tuple(LayerNorm(size, layer_norm_eps) for size in sizes[1 : 1 + num_norms])
            if layer_norm
            else None
        )
        self.activation = activation
        self.activate_final = activate_final

    def __call__(self, x: Float[Array, " in_size"]) -> Float[Array, " out_size"]:
        num_layers = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < num_layers or self.activate_final:
                x = self.activation(x)
                if self.norms is not None:
                    x = self.norms[i](x)
        return x


class VelocityNetwork(eqx.Module):
    """A flow velocity field `v(t, x, obs) = MLP(concat(obs, x, t))`.

    Called in diffrax's `(t, y, args)` order, so it drops into `diffrax.ODETerm` and into every
    core function of `qam`. `t` is the raw scalar flow time (0 noise, 1 action), no Fourier
    features; `x` the flat action (chunk) of size `action_dim`; `obs` a flat observation.
    `layer_norm` / `layer_norm_eps`: as in `MLP` (the reference actor has no LayerNorm).
    """

    mlp: MLP

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_sizes: Sequence[int] = (512, 512, 512, 512),
        *,
        layer_norm: bool = False,
        layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS,
        key: PRNGKeyArray,
    ):
        self.mlp = MLP(
            obs_dim + action_dim + 1,
            action_dim,
            hidden_sizes,
            layer_norm=layer_norm,
            layer_norm_eps=layer_norm_eps,
            key=key,
        )

    def __call__(
        self, t: Float[ArrayLike, ""], x: Float[Array, " action"], obs: Float[Array, " obs"]
    ) -> Float[Array, " action"]:
        t = jnp.asarray(t, dtype=x.dtype)
        return self.mlp(jnp.concatenate([obs, x, t[None]]))


class CriticEnsemble(eqx.Module):
    """An ensemble of `num_critics` independently initialised Q-networks `Q_e(s, a)`.

    The members are stored stacked (every parameter has a leading axis of size `E`) and
    evaluated with one vmapped call. Each member is `MLP(concat(obs, action)) -> scalar`, with
    LayerNorm after every hidden activation by default (as in the reference critic), with
    epsilon `layer_norm_eps` (default `1e-6`, flax's, as the reference critic).
    """

    members: MLP
    num_critics: int = eqx.field(static=True)

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_sizes: Sequence[int] = (512, 512, 512, 512),
        *,
        num_critics: int = 10,
        layer_norm: bool = True,
        layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS,
        key: PRNGKeyArray,
    ):
        if num_critics < 1:
            raise ValueError(f"`CriticEnsemble(num_critics=...)` must be >= 1; got {num_critics}.")

        @eqx.filter_vmap
        def make(k):
            return MLP(
                obs_dim + action_dim,
                1,
                hidden_sizes,
                layer_norm=layer_norm,
                layer_norm_eps=layer_norm_eps,
                key=k,
            )

        self.members = make(jax.random.split(key, num_critics))
        self.num_critics = num_critics

    def __call__(
        self, obs: Float[Array, " obs"], action: Float[Array, " action"]
    ) -> Float[Array, " ensemble"]:
        inputs = jnp.concatenate([obs, action])

        @eqx.filter_vmap(in_axes=(eqx.if_array(0), None))
        def evaluate(member, x):
            return member(x)[0]

        return evaluate(self.members, inputs)

    def batched(
        self, obs: Float[Array, "batch obs"], action: Float[Array, "batch action"]
    ) -> Float[Array, "batch ensemble"]:
        """`jax.vmap(self)(obs, action)`, computed with the ensemble axis outermost.

        Equal to the vmapped single-example call, but each layer becomes one batched matrix
        product per member on a `(batch, features)` block, with no transposes between layers:
        on CPU a 10 x 4 x 512 ensemble's value-and-gradient on a batch of 256 is about 20%
        faster than `jax.vmap(self)`. Use it for whole batches inside a jitted update.
        """
        inputs = jnp.concatenate([obs, action], axis=-1)

        @eqx.filter_vmap(in_axes=(eqx.if_array(0), None))
        def evaluate(member, x):
            return jax.vmap(lambda row: member(row)[0])(x)

        return evaluate(self.members, inputs).T


def tanh_gaussian_log_prob(
    pre_tanh: Float[Array, " action"],
    mean: Float[Array, " action"],
    log_std: Float[Array, " action"],
) -> Float[Array, ""]:
    """Log-density of `a = tanh(u)`, `u ~ N(mean, exp(log_std)^2)`, at the pre-tanh sample `u`.

    `log p(a) = sum_d [log N(u_d; mean_d, std_d) - log(1 - tanh(u_d)^2)]`, with the Jacobian term
    in the stable form `log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2 u))`. Working from `u`
    avoids `atanh` of a squashed sample near `+-1`.
    """
    std_normal = (pre_tanh - mean) * jnp.exp(-log_std)
    gaussian = -0.5 * std_normal**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi)
    log_det = 2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))
    return jnp.sum(gaussian - log_det)


class TanhGaussianPolicy(eqx.Module):
    """A tanh-squashed diagonal Gaussian `pi(a | x)` on a flat input `x` (QAM-EDIT's edit policy).

    Trunk `MLP(x)` with the activation on its last layer, then two linear heads for the mean and
    the log-std; the log-std is clipped to `[log_std_min, log_std_max]` (default `[-20, 2]`).
    `layer_norm` / `layer_norm_eps`: as in `MLP` (the reference edit policy has no LayerNorm).
    """

    trunk: MLP
    mean_head: eqx.nn.Linear
    log_std_head: eqx.nn.Linear
    log_std_min: float = eqx.field(static=True)
    log_std_max: float = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        action_dim: int,
        hidden_sizes: Sequence[int] = (512, 512, 512, 512),
        *,
        layer_norm: bool = False,
        layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS,
        log_std_min: float = -20.0,
        log_std_max: float = 2.0,
        key: PRNGKeyArray,
    ):
        if not hidden_sizes:
            raise ValueError("`TanhGaussianPolicy(hidden_sizes=...)` must name at least one layer.")
        trunk_key, mean_key, std_key = jax.random.split(key, 3)
        *inner, last = hidden_sizes
        self.trunk = MLP(
            in_size,
            last,
            inner,
            layer_norm=layer_norm,
            layer_norm_eps=layer_norm_eps,
            activate_final=True,
            key=trunk_key,
        )
        self.mean_head = _xavier_linear(last, action_dim, key=mean_key)
        self.log_std_head = _xavier_linear(last, action_dim, key=std_key)
        self.log_std_min = log_std_min
        self.log_std_max = log_std_max

    def distribution(
        self, x: Float[Array, " in_size"]
    ) -> tuple[Float[Array, " action"], Float[Array, " action"]]:
        """The pre-tanh Gaussian's `(mean, log_std)`."""
        features = self.trunk(x)
        log_std = jnp.clip(self.log_std_head(features), self.log_std_min, self.log_std_max)
        return self.mean_head(features), log_std

    def sample_and_log_prob(
        self, x: Float[Array, " in_size"], *, key: PRNGKeyArray
    ) -> tuple[Float[Array, " action"], Float[Array, ""]]:
        """A reparameterised sample `a = tanh(mean + std * eps)` and its log-density."""
        mean, log_std = self.distribution(x)
        pre_tanh = mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)
        return jnp.tanh(pre_tanh), tanh_gaussian_log_prob(pre_tanh, mean, log_std)

    def mode(self, x: Float[Array, " in_size"]) -> Float[Array, " action"]:
        """`tanh(mean)`."""
        return jnp.tanh(self.distribution(x)[0])


class DeterministicTanhPolicy(eqx.Module):
    """A deterministic tanh policy `mu(x) = tanh(W phi(x) + b)` on a flat input (ReBRAC's actor).

    `phi` is a trunk `MLP(x)` with the activation (and LayerNorm, if asked) after its last
    hidden layer too; the head `W` is initialised `variance_scaling(head_scale, "fan_avg",
    "uniform")`, i.e. uniform on `+-sqrt(3 * head_scale / ((fan_in + fan_out) / 2))` (Xavier
    uniform is `head_scale = 1`; the reference's `0.01` gives `+-0.01057` for 512 -> 25), with
    a zero bias `b`, so a fresh policy outputs chunks close to 0. Trunk layers are
    Xavier-uniform with zero biases, as `MLP`.

    **Arguments:**

    - `in_size`, `action_dim`: input size and output size `D`.
    - `hidden_sizes`: the trunk's widths (at least one).
    - `layer_norm` / `layer_norm_eps`: as in `MLP` (the reference actor has no LayerNorm).
    - `head_scale`: the head's variance-scaling factor, `> 0` (default `0.01`).
    - `key`: a PRNG key.
    """

    trunk: MLP
    head: eqx.nn.Linear

    def __init__(
        self,
        in_size: int,
        action_dim: int,
        hidden_sizes: Sequence[int] = (512, 512, 512, 512),
        *,
        layer_norm: bool = False,
        layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS,
        head_scale: float = 0.01,
        key: PRNGKeyArray,
    ):
        if not hidden_sizes:
            raise ValueError(
                "`DeterministicTanhPolicy(hidden_sizes=...)` must name at least one layer."
            )
        if not 0 < head_scale < float("inf"):
            raise ValueError(
                f"`DeterministicTanhPolicy(head_scale=...)` must be finite and > 0; got "
                f"{head_scale!r}."
            )
        trunk_key, head_key = jax.random.split(key)
        *inner, last = hidden_sizes
        self.trunk = MLP(
            in_size,
            last,
            inner,
            layer_norm=layer_norm,
            layer_norm_eps=layer_norm_eps,
            activate_final=True,
            key=trunk_key,
        )
        # Xavier uniform on +-sqrt(6 / (fan_in + fan_out)) times sqrt(head_scale) is uniform on
        # +-sqrt(6 * head_scale / (fan_in + fan_out)): variance scaling with fan_avg.
        head = _xavier_linear(last, action_dim, key=head_key)
        self.head = eqx.tree_at(lambda m: m.weight, head, head.weight * head_scale**0.5)

    def __call__(self, x: Float[Array, " in_size"]) -> Float[Array, " action"]:
        return jnp.tanh(self.head(self.trunk(x)))

"""Gating any Flax NNX model from its traced structure: :func:`sparsify`.

:func:`sparsify` traces a plain NNX model (:func:`~sparsejax.structure.trace.trace_structure`),
puts one gate module on every removable unit group, and returns a :class:`Sparsified` module that
a user trains in their own optax loop: its forward pass applies the gates, ``penalty()`` is the
expected-L0 (or expected-FLOPs) regulariser and ``report()`` the test-time sparsity.

Where a gate acts. A gate ``z_u`` of unit ``u`` multiplies the rows of every kernel that *reads*
the unit (each consumer's input-axis member of the group) while the model runs. Every consumer
then sees ``z_u * a_u`` instead of the unit's activation ``a_u``, so a closed gate (``z_u = 0``)
equals removing the unit from the network, whatever lies between the producer and the consumers:
an activation with ``f(0) != 0`` (sigmoid), a BatchNorm in training mode (which would normalise a
gate on the producer's kernel away), a residual stream read by many blocks, or a channel flattened
into a block of features (each feature row gets its channel's gate). This is the input-neuron
gating of Louizos, Welling & Kingma (2018, sec. 4.1) applied at every consumer. A unit that no
kernel reads (the query/key dimension of attention, contracted between two activations, alone or
in one group with the values of a fused ``qkv`` projection) is gated on the output of its first
producer instead (its first column of the kernel and the bias), which removes the unit from
that product. A group whose units a reduction reads (LayerNorm / RMSNorm statistics,
listed in ``UnitGroup.caveats``: a pre-norm transformer's hidden stream) gets no gate: the
statistic would still see a closed unit, so its producers' columns could never go and slimming
keeps the group whole; the report lists it among ``ungated`` with the reduction that reads it.

Penalty. For hard-concrete gates (Louizos et al. 2018, eq. 12 for the probability, sec. 4.2 for
group sparsity) the expected L0 norm of the gated parameters is

    E[L0] = sum_g |g| * sum_{u in g} P(z_u != 0),
    P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta)),

and for the binary gates of L0-ARM (Li & Ji 2019) P(z != 0) = sigmoid(k * phi),

with ``|g|`` the number of parameters removed with one unit of group ``g`` (its producer's kernel
slice and bias, its normaliser parameters, every consumer's kernel rows), computed from the trace
as ``(count().params - count({g: 0}).params) / size_g``. With ``cost="flops"`` the weight is the
MACs per example removed with a unit instead. Both are first-order: a kernel entry between two
gated groups is counted in both groups' weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.estimators import binary
from sparsejax.gates.binary import BinaryGate
from sparsejax.gates.hard_concrete import HardConcreteGate
from sparsejax.structure.trace import Member, TracedStructure, UnitGroup, trace_structure
from sparsejax.structure.trace.analyze import Apply, call_model

METHODS: tuple[str, ...] = ("l0_hc", "l0_arm")
GRANULARITIES: tuple[str, ...] = ("unit",)
COSTS: tuple[str, ...] = ("params", "flops")


def evaluation_copy(module: nnx.Module) -> nnx.Module:
    """A copy of ``module`` (sharing its arrays) in NNX evaluation mode; ``module`` keeps its
    own mode."""
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, state)
    copy.eval()
    return copy


@dataclasses.dataclass(frozen=True)
class GatedSlice:
    """Gate values ``z[units[k]]`` multiply index ``indices[k]`` of axis ``axis`` of the
    parameter at ``path``; with ``axis`` None, ``z`` has the parameter's shape and multiplies it
    entry by entry (weight gates)."""

    path: str
    axis: int | None
    indices: tuple[int, ...] = ()
    units: tuple[int, ...] = ()


def slice_factors(s: GatedSlice, z: jax.Array, size: int) -> jax.Array:
    """Factors of the ``size`` entries along the axis of ``s``: ``z[..., units[k]]`` at index
    ``indices[k]``, 1 elsewhere; leading dimensions of ``z`` (examples) are kept."""
    indices, units = np.asarray(s.indices), np.asarray(s.units)
    if z.shape[-1] == size and np.array_equal(indices, np.arange(size)) and np.array_equal(
            units, indices):
        return z
    factors = jnp.ones((*z.shape[:-1], size), z.dtype)
    return factors.at[..., indices].set(z[..., units])


def scaled_slice(value: jax.Array, s: GatedSlice, z: jax.Array) -> jax.Array:
    """``value`` (the parameter at ``s.path``) with the gate values ``z`` multiplied into the
    slice ``s``."""
    if s.axis is None:
        return value * z.astype(value.dtype)
    factor = slice_factors(s, z, value.shape[s.axis])
    shape = [1] * value.ndim
    shape[s.axis] = -1
    return value * factor.reshape(shape).astype(value.dtype)


@contextlib.contextmanager
def parameters_gated(
    model: nnx.Module, gated: Sequence[tuple[GatedSlice, jax.Array]]
) -> Iterator[None]:
    """Inside the block, every parameter of ``model`` named by a :class:`GatedSlice` of
    ``gated`` is multiplied by its gate values (several slices of one parameter multiply
    together); the original values are restored on leaving, so gradients reach both the
    parameters and the gates through the product."""
    scaled: dict[str, tuple[nnx.Variable, jax.Array, jax.Array]] = {}
    for s, z in gated:
        if s.path not in scaled:
            var = variable_at(model, s.path)
            scaled[s.path] = (var, var[...], var[...])
        var, original, value = scaled[s.path]
        scaled[s.path] = (var, original, scaled_slice(value, s, z))
    try:
        for var, _, value in scaled.values():
            var.set_value(value)
        yield
    finally:
        for var, original, _ in scaled.values():
            var.set_value(original)


@dataclasses.dataclass(frozen=True)
class GroupReport:
    """Test-time state of one gated group: ``kept`` of its ``size`` units have a nonzero gate."""

    group: int
    size: int
    kept: int
    producers: tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class UngatedGroup:
    """A group the trace found that keeps every unit, and why (``reason``: the operation that
    blocks it, or the normaliser's statistic that reads its units)."""

    group: int
    size: int
    producers: tuple[tuple[str, int], ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """The network under its test-time gates: per-group kept units, and kept params (kernel
    weights + layer biases) and MACs per example, from :meth:`TracedStructure.count`;
    ``ungated`` the groups without gates, each with the reason."""

    groups: tuple[GroupReport, ...]
    params: float
    total_params: float
    flops: float
    total_flops: float
    ungated: tuple[UngatedGroup, ...] = ()

    @property
    def params_fraction(self) -> float:
        return self.params / self.total_params

    @property
    def flops_fraction(self) -> float:
        return self.flops / self.total_flops

    @property
    def architecture(self) -> str:
        """Kept units of the gated groups, e.g. ``"12-7"``."""
        return "-".join(str(g.kept) for g in self.groups)


def layer_readers(structure: TracedStructure, group: UnitGroup) -> tuple[Member, ...]:
    """The members of ``group`` on the input axes of kernels that read its units (not those
    that produce them)."""
    producer_axes = {p for g in structure.groups for p in g.producers}
    kernels = {layer.kernel for layer in structure.layers}
    return tuple(
        m for m in group.members if m.path in kernels and (m.path, m.axis) not in producer_axes
    )


def gated_slices(structure: TracedStructure, group: UnitGroup) -> tuple[GatedSlice, ...]:
    """Where the gates of ``group`` act: the input-axis slices of the kernels that read its
    units; for the units that no kernel reads (attention's queries and keys, which only the
    scores read, alone or beside the values of a fused ``qkv`` projection), the first index
    of each in its first producer's output slice and bias."""
    consumers = layer_readers(structure, group)
    slices = [GatedSlice(m.path, m.axis, m.indices, m.units) for m in consumers]
    read = {unit for m in consumers for unit in m.units}
    if len(read) == group.size:
        return tuple(slices)
    path, axis = group.producers[0]
    bias = next((l.bias for l in structure.layers if l.kernel == path and l.bias), None)
    for m in group.members:
        if (m.path, m.axis) == (path, axis) or m.path == bias:
            first: dict[int, int] = {}
            for index, unit in zip(m.indices, m.units):
                if unit not in read:
                    first.setdefault(unit, index)
            if first:
                slices.append(GatedSlice(m.path, m.axis, tuple(first.values()), tuple(first)))
    return tuple(slices)


def variable_at(model: nnx.Module, path: str) -> nnx.Variable:
    """The variable at a dotted state path such as ``"blocks.0.conv.kernel"``."""
    node = model
    for part in path.split("."):
        if hasattr(node, part):
            node = getattr(node, part)
        else:
            node = node[int(part) if part.isdigit() else part]
    return node


def _unit_costs(structure: TracedStructure, group: UnitGroup, cost: str) -> float:
    """Params (or MACs per example) removed with one unit of ``group``, all others kept."""
    full = structure.count()
    without = structure.count({group.index: 0.0})
    removed = full.params - without.params if cost == "params" else full.flops - without.flops
    return removed / group.size


class Sparsified(nnx.Module):
    """A user's NNX model with a gate on every prunable unit group; made by :func:`sparsify`.

    ``model`` is the original module (its parameters are trained as they are; the gates scale
    them only while the forward pass runs), ``gates`` one gate module per gated group. Calling
    the module runs ``model(*args, **kwargs)`` with the gates applied: a random draw from
    ``rngs.gates`` in training mode (``.train()``, the default) and the deterministic test-time
    gate in evaluation mode (``.eval()``); NNX's ``train()`` / ``eval()`` reach the wrapped
    model's Dropout and BatchNorm as usual.
    """

    def __init__(
        self,
        model: nnx.Module,
        structure: TracedStructure,
        *,
        rngs: nnx.Rngs,
        method: str = "l0_hc",
        cost: str = "params",
        droprate_init: float = 0.5,
    ):
        self.model = model
        self.method = method
        self.structure = structure
        groups = [g for g in structure.groups if g.removable]
        self.group_indices = tuple(g.index for g in groups)
        self.slices = tuple(gated_slices(structure, g) for g in groups)
        self.unit_costs = tuple(_unit_costs(structure, g, cost) for g in groups)
        self.cost = cost
        gate_type = BinaryGate if method == "l0_arm" else HardConcreteGate
        self.gates = nnx.List(
            [gate_type(g.size, rngs=rngs, droprate_init=droprate_init) for g in groups]
        )
        self.deterministic = False

    def gate_values(self, rngs: nnx.Rngs | None = None) -> list[jax.Array]:
        """One vector of gate values per gated group: sampled in training mode, else the
        test-time gates."""
        return [gate(train=not self.deterministic, rngs=rngs) for gate in self.gates]

    def __call__(
        self,
        *args,
        rngs: nnx.Rngs | None = None,
        gates: list[jax.Array] | None = None,
        **kwargs,
    ):
        """``model(*args, **kwargs)`` with the gates applied: drawn from ``rngs.gates`` in
        training, the test-time gates in evaluation, or the values ``gates`` (one vector per
        gated group) when given."""
        if gates is None:
            gates = self.gate_values(rngs)
        if len(gates) != len(self.slices):
            raise ValueError(f"{len(gates)} gate vectors given for {len(self.slices)} gated groups")
        with parameters_gated(self.model, self._gated(gates)):
            return self.model(*args, **kwargs)

    def _gated(self, gates: Sequence[jax.Array]) -> list[tuple[GatedSlice, jax.Array]]:
        """Every slice a gate scales, with its group's values ``gates`` (one vector per gated
        group), for :func:`parameters_gated`."""
        return [(s, z) for z, slices in zip(gates, self.slices) for s in slices]

    def expected(
        self, f: Callable[[jax.Array], jax.Array], *args, rngs: nnx.Rngs | None = None, **kwargs
    ) -> jax.Array:
        """One-sample estimate of E_z[f(model_z(*args, **kwargs))] whose gradient reaches the
        gate parameters, for either method: ``f`` maps the outputs to a scalar loss.

        ``l0_hc`` draws reparameterised hard-concrete gates, so this is ``f(self(*args,
        rngs=rngs))``. ``l0_arm`` draws binary gates z ~ Bernoulli(sigmoid(k phi)), which have
        no pathwise gradient; the gradient in ``phi`` is the ARM estimate (Yin & Zhou 2019; Li &
        Ji 2019), from a second, antithetic forward pass
        (:func:`sparsejax.estimators.binary.expectation`). In evaluation mode, ``f`` of the
        test-time outputs.
        """
        if self.method != "l0_arm" or self.deterministic or not self.gates:
            return f(self(*args, rngs=rngs, **kwargs))
        if rngs is None:
            raise ValueError(
                "l0_arm draws its gates in training and needs rngs=nnx.Rngs(gates=key)"
            )
        first = self.gates[0]
        return binary.expectation(
            lambda z: f(self(*args, gates=z, **kwargs)),
            [gate.phi[...] for gate in self.gates],
            rngs.gates(),
            estimator="arm",
            gate_fn=first.gate_fn,
            k=first.k,
        )

    def penalty(self) -> jax.Array:
        """Expected L0 of the gated parameters, sum_g |g| sum_u P(z_u != 0) (Louizos et al.
        2018, eq. 12 and sec. 4.2), ``|g|`` the params (or MACs) one unit of group g removes."""
        terms = [
            cost * jnp.sum(gate.prob_nonzero())
            for cost, gate in zip(self.unit_costs, self.gates)
        ]
        return jnp.sum(jnp.stack(terms)) if terms else jnp.zeros(())

    def keep_masks(self) -> dict[int, np.ndarray]:
        """Per traced group index, 1.0 where the test-time gate is nonzero."""
        return {
            index: np.asarray(gate.test_gate() > 0, np.float64)
            for index, gate in zip(self.group_indices, self.gates)
        }

    def slim(
        self,
        example_input: jax.Array | jax.ShapeDtypeStruct,
        *,
        round_to: int = 1,
        check: jax.Array | None = None,
        apply: Apply = call_model,
    ):
        """The slim network of the model under its test-time gates: a
        :class:`~sparsejax.structure.slim_trace.SlimFunction` (a pure function with its
        parameters, ``save()``-able and loaded by
        :func:`~sparsejax.structure.slim_trace.load_slim_function` without the model's class)
        with the units of closed gates removed and the other gate values folded into the
        kernels that read them; so are units that only output zeros, and those of constant
        output that dense readers fold into their biases
        (:mod:`~sparsejax.structure.slim_trace.unread`). ``round_to=K`` keeps multiples of K
        units per group (adding the units most likely open); ``check``, a batch of inputs,
        records the largest output difference to this gated model in evaluation mode in the
        report. ``apply(model, x)`` is the model's forward pass (default ``model(x)``), run in
        evaluation mode; for ``check`` it is also applied to this gated module, so it should
        only call the model (e.g. ``lambda m, x: m(x, train=False)``). See
        :func:`~sparsejax.structure.slim_trace.slim_traced`."""
        # These import this module.
        from sparsejax.structure.slim_trace import slim_traced
        from sparsejax.structure.slim_trace.unread import units_left

        with parameters_gated(self.model, self._gated([g.test_gate() for g in self.gates])):
            keep, replaced, _ = units_left(self.model, self.structure, example_input, apply)
            slim = slim_traced(
                self.model,
                example_input,
                structure=self.structure,
                keep=keep,
                scores={i: np.asarray(gate.prob_nonzero())
                        for i, gate in zip(self.group_indices, self.gates)},
                round_to=round_to,
                replaced=replaced,
                apply=apply,
            )
        if check is not None:
            slim.check(nnx.jit(apply)(evaluation_copy(self), check), check)
        return slim

    def report(self) -> SparsityReport:
        """Kept units per gated group, kept params and MACs under the test-time gates."""
        masks = self.keep_masks()
        full, kept = self.structure.count(), self.structure.count(masks)
        groups = tuple(
            GroupReport(
                index,
                self.structure.groups[index].size,
                int(masks[index].sum()),
                self.structure.groups[index].producers,
            )
            for index in self.group_indices
        )
        ungated = tuple(
            UngatedGroup(g.index, g.size, g.producers, g.obstacle.describe())
            for g in self.structure.groups
            if not g.removable
        )
        return SparsityReport(groups, kept.params, full.params, kept.flops, full.flops, ungated)


def sparsify(
    model: nnx.Module,
    example_input: jax.Array | jax.ShapeDtypeStruct,
    *,
    method: str = "l0_hc",
    granularity: str = "unit",
    cost: str = "params",
    apply: Apply = call_model,
    rngs: nnx.Rngs | int = 0,
    droprate_init: float = 0.5,
) -> Sparsified:
    """Gate every removable unit group of a plain NNX model, found by tracing its forward pass.

    ``example_input`` (an array or a ``jax.ShapeDtypeStruct``; only its shape and dtype are used)
    and ``apply(model, x)`` (default ``model(x)``) define the traced forward pass. Each group that
    the trace finds removable (neurons, channels, residual-stream channels, attention heads of a
    factored kernel; not a group a normaliser's statistic reads, see the module docstring) gets
    a hard-concrete gate (Louizos et al. 2018), with ``log_alpha`` initialised around
    ``logit(1 - droprate_init)`` from ``rngs.params``.

    The result is an NNX module: call it like the model, with ``rngs=nnx.Rngs(gates=key)`` in
    training mode; add ``lam * gated.penalty()`` to the loss; ``gated.eval()`` for test-time
    gates and ``gated.report()`` for kept units, params and FLOPs. The gate parameters are
    :class:`~sparsejax.gates.GateParam` (an ``nnx.Param``), so ``nnx.Optimizer(gated, tx,
    wrt=nnx.Param)`` trains weights and gates together. See the module docstring for where the
    gates act and what the penalty counts.

    Args:
      model: a Flax NNX module.
      example_input: an input batch, or its shape and dtype.
      method: ``"l0_hc"`` (hard-concrete gates) or ``"l0_arm"`` (binary gates with ARM
        gradients; train through :meth:`Sparsified.expected`).
      granularity: ``"unit"`` (one gate per unit of every removable group).
      cost: what a unit's gate is weighted by in the penalty: ``"params"`` or ``"flops"``
        (multiply-accumulates per example).
      apply: ``apply(model, x)`` runs the forward pass traced for the structure.
      rngs: an ``nnx.Rngs`` (its ``params`` stream initialises the gates) or a seed.
      droprate_init: initial probability that a gate is closed.

    Raises:
      ValueError: for an unknown method, granularity or cost.
    """
    for name, value, allowed in (
        ("method", method, METHODS),
        ("granularity", granularity, GRANULARITIES),
        ("cost", cost, COSTS),
    ):
        if value not in allowed:
            raise ValueError(f"sparsify: unknown {name} {value!r}; choose one of {allowed}")
    if isinstance(rngs, int):
        rngs = nnx.Rngs(params=rngs)
    structure = trace_structure(model, example_input, apply=apply)
    return Sparsified(
        model, structure, rngs=rngs, method=method, cost=cost, droprate_init=droprate_init
    )


__all__ = [
    "GatedSlice",
    "GroupReport",
    "Sparsified",
    "SparsityReport",
    "UngatedGroup",
    "gated_slices",
    "parameters_gated",
    "sparsify",
    "variable_at",
]


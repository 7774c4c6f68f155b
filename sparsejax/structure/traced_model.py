"""Any plain Flax NNX model as the engine's :class:`~sparsejax.models.base.GatedModel`, from its
traced structure: :class:`TracedModel` and, for configs and the command line, the model spec
``MODULE:FACTORY`` (:func:`build_any_model`).

The engine and the methods see a model through its declarations: :class:`Layer` geometry (for
params and FLOPs), :class:`GateSlot` places for gates and :class:`ChannelCoupling` streams. A
:class:`TracedModel` derives them from :func:`~sparsejax.structure.trace.trace_structure` instead
of a hand-written declaration:

- **Layers**: one per traced dense or conv product, named after the module that holds its kernel
  (``"blocks.0.conv"``; the parameter's path when it is not called ``kernel``), with the
  kernel's shape, its bias, and its output positions (MACs per kernel weight from the trace).
  Its ``inputs`` are the gated groups with members on the kernel's input axis (second to last),
  placed by tile count or, for a concatenation or any other arrangement, by :class:`UnitIndex`;
  its ``outputs`` the group its output axis (last) produces.
- **Gate slots** at unit granularity: one per *prunable* traced group, named after its first
  producer, ``(size,)`` gates. The gates act on the consumers, as :func:`sparsejax.sparsify`
  does (:func:`~sparsejax.structure.sparsify.gated_slices`): gate ``z_u`` multiplies the kernel
  rows of every layer that reads unit ``u`` while the forward pass runs, so a closed gate
  removes the unit exactly. ``group_params`` is the params one unit takes with it (its
  producers' kernel slices and biases and every consumer's rows), the ``|g|`` of the expected-L0
  penalty. For the methods that read a slot's layer (gated L2, group norms) the slot names its
  first producer and that kernel's output axis. At weight granularity every traced kernel gets
  one gate per entry (a slot named after its layer), multiplied into the kernel.
- **Couplings**: a group with several producers (a residual stream) is a
  :class:`ChannelCoupling` of their layers (``fixed`` when the group is not prunable).

The wrapped module runs in NNX training mode (``model.train()``: BatchNorm on batch
statistics) when the engine trains and in evaluation mode (``model.eval()``) otherwise. What the
trace cannot map onto the layer geometry (a kernel whose input and output are not its last two
axes, a kernel read by several products, FLOPs no layer owns) is refused with a
:class:`~sparsejax.errors.ConfigError` naming the layer.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.models.base import (
    ChannelCoupling,
    GatedModel,
    GateFactory,
    GateSlot,
    Granularity,
    Layer,
    UnitIndex,
    check_granularity,
)
from sparsejax.models.registry import MODELS, build_model
from sparsejax.structure.accounting import count_network
from sparsejax.structure.sparsify import (
    GatedSlice,
    gated_slices,
    parameters_gated,
    variable_at,
)
from sparsejax.structure.trace import (
    Member,
    TracedStructure,
    UnitGroup,
    trace_structure,
)
from sparsejax.user_code import import_named

DROPRATE_INIT = 0.5
"""Initial drop rate of every gate of a traced model (the L0 references' hidden-layer value)."""
COUNT_TOLERANCE = 1e-6
"""Relative difference allowed between the layer accounting (float32) and the exact trace."""

Factory = Callable[..., nnx.Module]


@dataclasses.dataclass(frozen=True)
class LayerParameters:
    """What the methods read of a traced layer (:meth:`TracedModel.layer_module`): its kernel
    and bias variables (the bias None when the layer has none)."""

    kernel: nnx.Variable
    bias: nnx.Variable | None


def _layer_name(kernel_path: str) -> str:
    """The name of the layer whose kernel is the parameter ``kernel_path``: its module,
    ``"blocks.0.conv"`` for ``"blocks.0.conv.kernel"``, or the parameter's own path when it is
    not called ``kernel`` (a module holding several weights)."""
    return kernel_path.removesuffix(".kernel")


def _placement(member: Member, axis_size: int, group_size: int) -> int | UnitIndex:
    """A tile count when ``member`` repeats the group's units over the whole axis in order
    (channel fastest), else the explicit :class:`UnitIndex`."""
    indices, units = np.asarray(member.indices), np.asarray(member.units)
    tiled = (
        indices.size == axis_size
        and axis_size % group_size == 0
        and np.array_equal(indices, np.arange(axis_size))
        and np.array_equal(units, np.arange(axis_size) % group_size)
    )
    if tiled:
        return axis_size // group_size
    return UnitIndex(member.indices, member.units, group_size)


def _slot_names(structure: TracedStructure) -> dict[int, str]:
    """Slot name of every prunable group: its first producer's module."""
    return {g.index: _layer_name(g.producers[0][0]) for g in structure.groups if g.prunable}


def _unit_params(structure: TracedStructure, group: UnitGroup) -> float:
    """Params removed with one unit of ``group`` (all its units alike)."""
    removed = structure.count().params - structure.count({group.index: 0.0}).params
    return removed / group.size


def traced_layers(
    structure: TracedStructure, slots: dict[int, str], granularity: Granularity
) -> tuple[Layer, ...]:
    """The :class:`Layer` of every traced layer, in network order; ``slots`` names the gated
    groups (their units switch layer units off at unit granularity).

    Raises:
      ConfigError: for a layer the geometry cannot describe.
    """
    producer_axes = {p for g in structure.groups for p in g.producers}
    names = [_layer_name(layer.kernel) for layer in structure.layers]
    if len(set(names)) != len(names):
        shared = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(
            f"traced model: the kernels of {shared} are read by several products (tied or "
            "shared weights), which the layer accounting cannot count; use one kernel per product"
        )
    layers = []
    for name, layer, count in zip(names, structure.layers, structure.layer_counts()):
        shape = structure.param_shapes[layer.kernel]
        outputs = {axis for path, axis in producer_axes if path == layer.kernel}
        if len(shape) < 2 or not outputs <= {len(shape) - 1}:
            raise ConfigError(
                f"traced model: layer {name!r} has a kernel of shape {shape} whose outputs are "
                f"on axes {sorted(outputs)}; the accounting needs kernels laid out (..., in, out) "
                "like nnx.Linear and nnx.Conv"
            )
        positions = count.macs / count.weights
        if positions != round(positions):
            raise ConfigError(
                f"traced model: layer {name!r} has {count.macs} MACs for {count.weights} weights, "
                "not a whole number of output positions"
            )
        sources = {"inputs": [], "outputs": []}
        for side, axis in (("inputs", len(shape) - 2), ("outputs", len(shape) - 1)):
            reads_itself = side == "inputs" and (layer.kernel, axis) in producer_axes
            if granularity != "unit" or reads_itself:
                continue
            for group in structure.groups:
                member = group.member(layer.kernel, axis)
                if member is not None and group.index in slots:
                    placement = _placement(member, shape[axis], group.size)
                    sources[side].append((slots[group.index], placement))
        layers.append(
            Layer(
                name,
                shape,
                int(round(positions)),
                has_bias=layer.bias is not None,
                inputs=tuple(sources["inputs"]),
                outputs=tuple(sources["outputs"]),
                kernel_slot=name if granularity == "weight" else None,
            )
        )
    return tuple(layers)


def _check_counts(structure: TracedStructure, layers: tuple[Layer, ...]) -> None:
    """The layer accounting of the dense network must give the trace's params and FLOPs."""
    traced = structure.count()
    declared = count_network(layers, {})
    for what, exact in (("params", traced.params), ("flops", traced.flops)):
        value = float(declared[what])
        if abs(value - exact) > COUNT_TOLERANCE * max(exact, 1.0):
            raise ConfigError(
                f"traced model: the layers account for {value:.0f} {what} but the trace finds "
                f"{exact:.0f} (products of two activations or parameters read outside a dense "
                "or conv layer are not supported yet)"
            )


class TracedModel(GatedModel):
    """A plain NNX module ``net`` (images NHWC -> logits) gated and counted from its trace; see
    the module docstring.

    Attributes:
      net: the wrapped module; its parameters are trained as they are (gates scale them only
        while the forward pass runs).
      structure: the :class:`~sparsejax.structure.trace.TracedStructure` of ``net`` in
        evaluation mode on one image of ``input_shape``.
      group_slots: ``(group index, slot name)`` of every gated group (unit granularity).
    """

    def __init__(
        self,
        net: nnx.Module,
        *,
        rngs: nnx.Rngs,
        input_shape: tuple[int, ...],
        num_classes: int,
        gate_factory: GateFactory | None = None,
        granularity: Granularity = "unit",
        name: str = "traced model",
    ):
        check_granularity(granularity)
        self.granularity = granularity
        self.net = net
        self.structure = _trace(net, input_shape, num_classes, name)
        slots = _slot_names(self.structure) if granularity == "unit" else {}
        layers = traced_layers(self.structure, slots, granularity)
        _check_counts(self.structure, layers)
        self.layer_params = tuple(
            (layer.name, traced.kernel, traced.bias)
            for layer, traced in zip(layers, self.structure.layers)
        )
        self.group_slots = tuple(slots.items())
        unit_slots = [self._unit_slot(group, name, layers) for group, name in self.group_slots]
        self.gated = self._gated_slices(slots)
        self._declare(
            list(layers),
            unit_slots,
            droprate_init=DROPRATE_INIT,
            gate_factory=gate_factory,
            rngs=rngs,
            couplings=self._couplings(),
        )
        if any(getattr(gate, "per_example", False) for gate in self.gates.values()):
            raise ConfigError(
                "the method draws its gates per example, but a traced model multiplies its gates "
                "into the parameters the whole batch shares: set config.per_example_gates=False "
                "where the method has it, or use a method with batch-shared gates (l0_hc, "
                "l0_arm, dep_l0_arm, l1, bounded_lp)"
            )

    def _unit_slot(self, group: int, name: str, layers: tuple[Layer, ...]) -> GateSlot:
        traced = self.structure.groups[group]
        path, axis = traced.producers[0]
        producer = next(layer for layer in layers if layer.name == _layer_name(path))
        return GateSlot(
            name,
            producer.name,
            (traced.size,),
            axis,
            producer.has_bias,
            DROPRATE_INIT,
            producer.kernel_shape,
            group_params=_unit_params(self.structure, traced),
        )

    def _gated_slices(
        self, slots: dict[int, str]
    ) -> tuple[tuple[str, tuple[GatedSlice, ...]], ...]:
        """Where each slot's gates act: the consumers' rows (unit granularity), the kernel
        (weight granularity)."""
        if self.granularity == "weight":
            return tuple(
                (_layer_name(layer.kernel), (GatedSlice(layer.kernel, None),))
                for layer in self.structure.layers
            )
        return tuple(
            (name, gated_slices(self.structure, self.structure.groups[group]))
            for group, name in slots.items()
        )

    def _couplings(self) -> tuple[ChannelCoupling, ...]:
        """The groups with several producers (residual streams), fixed when not prunable."""
        names = _slot_names(self.structure)
        return tuple(
            ChannelCoupling(
                names.get(g.index, f"group{g.index}"),
                tuple(_layer_name(path) for path, _ in g.producers),
                fixed=not g.prunable,
            )
            for g in self.structure.groups
            if len(g.producers) > 1
        )

    def forward(self, x: jax.Array, z: dict[str, jax.Array], *, train: bool) -> jax.Array:
        """``net(x)`` in NNX training (``train``) or evaluation mode, with the gate values
        ``z`` multiplied into the parameters they gate."""
        if train:
            self.net.train()
        else:
            self.net.eval()
        gated = [(s, z[name]) for name, slices in self.gated if name in z for s in slices]
        with parameters_gated(self.net, gated):
            return self.net(x)

    def layer_module(self, name: str) -> LayerParameters:
        """The kernel and bias variables of the traced layer ``name``."""
        for layer, kernel, bias in self.layer_params:
            if layer == name:
                bias_variable = None if bias is None else variable_at(self.net, bias)
                return LayerParameters(variable_at(self.net, kernel), bias_variable)
        raise KeyError(f"the traced model has no layer {name!r}")


def _trace(
    net: nnx.Module, input_shape: tuple[int, ...], num_classes: int, name: str
) -> TracedStructure:
    """The structure of ``net`` in evaluation mode, after checking that it maps a batch of
    images of ``input_shape`` to ``(batch, num_classes)`` logits."""
    if not isinstance(net, nnx.Module):
        raise ConfigError(
            f"{name} returned an object of type {type(net).__name__}, not a Flax NNX module"
        )
    if jax.tree.leaves(nnx.state(net, nnx.RngState)):
        raise ConfigError(
            f"{name} keeps random-number state (an nnx.Rngs stream, e.g. nnx.Dropout(rngs=...)), "
            "which the engine cannot place on devices or checkpoint yet; build the model without "
            "dropout"
        )
    net.eval()
    images = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    graphdef, state = nnx.split(net)
    try:
        logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)
    except Exception as error:  # the user's model failing on images is the user's to fix
        message = " ".join(str(error).split())
        raise ConfigError(
            f"{name} fails on images of shape (batch, {', '.join(map(str, input_shape))}): "
            f"{type(error).__name__}: {message[:300]}"
        ) from error
    shape = getattr(logits, "shape", None)
    if shape != (1, num_classes):
        raise ConfigError(
            f"{name} maps images of shape (1, {', '.join(map(str, input_shape))}) to an output "
            f"of shape {shape}, not logits of shape (batch, {num_classes})"
        )
    return trace_structure(net, images, apply=lambda model, x: model(x))


def load_factory(spec: str) -> Factory:
    """The factory ``FACTORY`` of module ``MODULE`` for ``spec = "MODULE:FACTORY"``, imported
    from the current directory or ``PYTHONPATH``; it must accept ``FACTORY(*, rngs,
    num_classes)``.

    Raises:
      ConfigError: for a module that cannot be imported, a missing or non-callable attribute,
        or a factory with another signature.
    """
    module_name, attribute, factory = import_named("model", spec, "FACTORY")
    if not callable(factory):
        what = "no attribute" if factory is None else "no callable"
        raise ConfigError(f"--model={spec}: module {module_name!r} has {what} {attribute!r}")
    try:
        inspect.signature(factory).bind(rngs=None, num_classes=1)
    except TypeError as error:
        raise ConfigError(
            f"--model={spec}: {attribute}{inspect.signature(factory)} cannot be called as "
            f"{attribute}(*, rngs, num_classes) ({error})"
        ) from error
    except ValueError:  # a builtin without a signature: let the call decide
        pass
    return factory


def build_traced_model(
    spec: str,
    *,
    rngs: nnx.Rngs,
    num_classes: int,
    input_shape: tuple[int, ...],
    gate_factory: GateFactory | None = None,
    granularity: Granularity = "unit",
) -> TracedModel:
    """The :class:`TracedModel` of the plain module ``FACTORY(rngs=..., num_classes=...)`` for
    ``spec = "MODULE:FACTORY"`` (:func:`load_factory`). The factory's ``nnx.Rngs`` has a
    ``params`` and a ``dropout`` stream, both derived from ``rngs.params``."""
    key = rngs.params()
    net_rngs = nnx.Rngs(params=jax.random.fold_in(key, 0), dropout=jax.random.fold_in(key, 1))
    net = load_factory(spec)(rngs=net_rngs, num_classes=num_classes)
    return TracedModel(
        net,
        rngs=rngs,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        gate_factory=gate_factory,
        granularity=granularity,
        name=f"--model={spec}",
    )


def is_model_spec(name: str) -> bool:
    """Whether ``name`` names a custom model (``MODULE:FACTORY``) rather than a zoo model."""
    return ":" in name


def check_model_name(name: str) -> None:
    """Refuse, with a :class:`ConfigError`, a name that is neither a registered model nor a
    loadable ``MODULE:FACTORY``."""
    if is_model_spec(name):
        load_factory(name)
    elif name not in MODELS:
        raise ConfigError(
            f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}, or "
            "MODULE:FACTORY for a factory of a plain NNX model in an importable module"
        )


def build_any_model(name: str, **kwargs) -> GatedModel:
    """A zoo model (:func:`~sparsejax.models.build_model`) or, for ``MODULE:FACTORY``, the
    :class:`TracedModel` of the factory's module (:func:`build_traced_model`)."""
    check_model_name(name)
    if is_model_spec(name):
        return build_traced_model(name, **kwargs)
    return build_model(name, **kwargs)


__all__ = [
    "LayerParameters",
    "TracedModel",
    "build_any_model",
    "build_traced_model",
    "check_model_name",
    "is_model_spec",
    "load_factory",
    "traced_layers",
]

"""What every gated model declares: its layers, its gate slots and how gates couple to layers.

A *gate slot* is a place where a method may put a gate module: the input neurons of a dense layer,
the output channels of a convolution, or (weight granularity) every entry of a kernel. A
*layer* records its kernel geometry and which slots switch off its input and output units, so that
active units, parameters and FLOPs of the pruned network (and their expectations under the gate
distribution) are computed in one place (:mod:`sparsejax.structure.accounting`) for every model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.gates.base import Gate

Array = np.ndarray | jax.Array

Granularity = Literal["unit", "weight"]
GRANULARITIES: tuple[str, ...] = ("unit", "weight")


@dataclasses.dataclass(frozen=True)
class GateSlot:
    """A place for gates.

    Attributes:
      name: the key of the gate in the model's ``gates`` and in explicit gate dicts.
      layer: the layer whose parameter groups the gates multiply.
      shape: shape of one draw: ``(units,)`` or the kernel's shape.
      axis: kernel axis indexed by the gates (0 for a dense layer's inputs, 3 for a conv's output
        channels), or None for weight gates (one gate per kernel entry).
      gates_bias: whether a gate also multiplies the bias of its group (conv output channels).
      droprate_init: the initial drop rate the reference uses for this slot.
      kernel_shape: shape of the gated layer's kernel.
      group_params: parameters one gate removes, where the model knows it better than the
        gated layer's geometry does (a traced model: the producers' slices, their biases and
        every consumer's rows), else None.
    """

    name: str
    layer: str
    shape: tuple[int, ...]
    axis: int | None
    gates_bias: bool
    droprate_init: float
    kernel_shape: tuple[int, ...]
    group_params: float | None = None

    @property
    def group_size(self) -> float:
        """Number of parameters one gate removes (|g| in the L0 papers)."""
        if self.group_params is not None:
            return self.group_params
        if self.axis is None:
            return 1
        return math.prod(self.kernel_shape) // self.kernel_shape[self.axis] + int(self.gates_bias)


@dataclasses.dataclass(frozen=True)
class SpanSlot(GateSlot):
    """A unit slot whose gates remove parameters in several layers (a transformer's head: its
    query, key, value and output-projection slices; an FFN unit; a sublayer; the hidden
    dimension); ``group_params`` is what one gate removes. Dep-L0 counts such a slot by the
    expected weights of every layer it gates
    (:func:`~sparsejax.methods.dep_penalty.span_expected_weights`) and chains its generator
    over a transformer's slots by family
    (:func:`~sparsejax.models.transformer.family_chain_order`)."""


@dataclasses.dataclass(frozen=True)
class SlotMember:
    """Entries of one parameter that a slot's gates remove: the *parameter groups of a slot*.

    Along ``axis`` of the parameter at ``path`` (an attribute path from the model, e.g.
    ``"blocks.0.attn.q.kernel"``, whose owner is a declared layer's name or a module path),
    index i belongs to unit ``units[i]`` of the slot; ``units`` None: index i is unit i. ``axis``
    None: every entry is its own unit (weight gates, the slot's shape is the parameter's).
    """

    path: str
    axis: int | None
    units: tuple[int, ...] | None = None


def per_unit(member: SlotMember, values: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Per-unit ``values`` of the slot spread over a member's parameter of ``shape``:
    broadcastable to it, each entry taking its unit's value."""
    if member.axis is None:
        return values
    along = values if member.units is None else values[jnp.asarray(member.units)]
    axis = member.axis % len(shape)
    return along.reshape((1,) * axis + (-1,) + (1,) * (len(shape) - axis - 1))


@dataclasses.dataclass(frozen=True)
class UnitIndex:
    """Where a slot's units sit among a layer's units when a tiling cannot say it (a traced
    model's concatenations and flattenings): unit ``units[k]`` of the slot multiplies the layer's
    unit ``indices[k]``; the layer's other units are not the slot's."""

    indices: tuple[int, ...]
    units: tuple[int, ...]
    slot_size: int


def unit_positions(placement: int | UnitIndex, layer_units: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, units)`` of a slot placed among ``layer_units`` units by ``placement`` (a tile
    count or a :class:`UnitIndex`): unit ``units[k]`` of the slot is the layer's unit
    ``indices[k]``."""
    if isinstance(placement, UnitIndex):
        return np.asarray(placement.indices, np.int64), np.asarray(placement.units, np.int64)
    indices = np.arange(layer_units)
    return indices, indices % (layer_units // placement)


def slot_size(placement: int | UnitIndex, layer_units: int) -> int:
    """The number of units of a slot placed among ``layer_units`` units by ``placement``."""
    return placement.slot_size if isinstance(placement, UnitIndex) else layer_units // placement


UnitSource = tuple[tuple[str, int | UnitIndex], ...]
"""Slots whose values multiply a layer's units: ((slot name, tile count or
:class:`UnitIndex`), ...); a tile count t repeats the slot's values t times (flattening an NHWC
map puts the channel fastest)."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """Geometry of one dense or conv layer and the slots that switch its units off.

    Attributes:
      kernel_shape: ``(in, out)`` or ``(kh, kw, in, out)``.
      out_positions: output spatial positions (H_out * W_out; 1 for a dense layer).
      inputs / outputs: slots whose values, each tiled the given number of times (flattening a
        NHWC map puts the channel fastest) or placed by a :class:`UnitIndex`, multiply the
        layer's input / output units.
      kernel_slot: the weight-granularity slot of this layer's kernel, if any.
      groups: feature groups of a grouped convolution (the kernel's in axis is ``in / groups``;
        a depthwise convolution has ``groups == in == out``).
      kernel_axes: the order in which the stored kernel's axes give ``kernel_shape`` (each side
        then flattened): ``(1, 0)`` for a kernel stored ``(out, in)`` and applied transposed (a
        tied embedding as the output head); None for a kernel stored in this order.
    """

    name: str
    kernel_shape: tuple[int, ...]
    out_positions: int = 1
    has_bias: bool = True
    inputs: UnitSource = ()
    outputs: UnitSource = ()
    kernel_slot: str | None = None
    groups: int = 1
    kernel_axes: tuple[int, ...] | None = None

    def geometry(self, kernel: Array) -> Array:
        """The stored ``kernel`` (or any NumPy or JAX array of its shape) in this layer's
        geometry ``kernel_shape``."""
        if self.kernel_axes is not None:
            kernel = kernel.transpose(self.kernel_axes)
        return kernel.reshape(self.kernel_shape)

    @property
    def in_units(self) -> int:
        return self.kernel_shape[-2] * self.groups

    @property
    def out_units(self) -> int:
        return self.kernel_shape[-1]

    @property
    def receptive_field(self) -> int:
        return math.prod(self.kernel_shape[:-2])


@dataclasses.dataclass(frozen=True)
class ChannelCoupling:
    """Layers whose output channels are one unit each: added channel by channel (a residual
    stream) or tied by what reads them (queries and keys by the attention scores, a depthwise
    convolution's channels).

    Channel c of every member is one unit: it can only be removed from all members at once, and
    every layer that reads the members' outputs loses its input c with it.

    Attributes:
      name: the coupling's name (in reports and errors).
      layers: the member layers.
      fixed: True when the width cannot change (e.g. option-A padding).
      stream: True for a residual stream (the members' outputs, after any BatchNorm, are
        summed, and layers beyond any one slot read the sum).
    """

    name: str
    layers: tuple[str, ...]
    fixed: bool = False
    stream: bool = True


GateFactory = Callable[[tuple[GateSlot, ...], nnx.Rngs], Mapping[str, Gate]]
"""Builds the gate modules of a model's slots, by slot name (a slot left out stays ungated):
a method's ``make_gates``."""


def each_slot(make_gate: Callable[[GateSlot, nnx.Rngs], Gate | None]) -> GateFactory:
    """The :data:`GateFactory` that builds every slot's gate with ``make_gate`` (None leaves a
    slot ungated); usable as a decorator."""

    def factory(slots: tuple[GateSlot, ...], rngs: nnx.Rngs) -> dict[str, Gate]:
        built = {slot.name: make_gate(slot, rngs) for slot in slots}
        return {name: gate for name, gate in built.items() if gate is not None}

    return factory


def weight_slots(
    layers: tuple[Layer, ...],
    droprate_init: float,
    kernel_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[GateSlot, ...]:
    """One weight-granularity slot per layer kernel that takes weight gates (its
    ``kernel_slot``), named after the layer, shaped like the kernel: ``kernel_shapes[name]``
    where given (a kernel whose layer geometry flattens several input or output axes into
    one), else the layer's ``kernel_shape``."""
    shapes = {l.name: l.kernel_shape for l in layers} | dict(kernel_shapes or {})
    return tuple(
        GateSlot(l.name, l.name, shapes[l.name], None, False, droprate_init, shapes[l.name])
        for l in layers if l.kernel_slot is not None
    )


class GatedModel(nnx.Module):
    """Base of the models: owns the gate modules and resolves gate values for a forward pass.

    Subclasses declare their layers and gate slots (:meth:`_declare`) and implement
    :meth:`forward`, the network given the gate values.
    """

    layers: tuple[Layer, ...]
    gate_slots: tuple[GateSlot, ...]
    granularity: Granularity
    channel_couplings: tuple[ChannelCoupling, ...] = ()
    activation_products: tuple[Layer, ...] = ()
    """Products of two activations (attention's ``Q K^T`` and ``A V``), declared as layers whose
    "kernel" is the other activation: they cost MACs but hold no parameters, have no module and
    take no weight gates, so they are kept out of ``layers`` and counted in FLOPs only."""

    def _declare(
        self,
        layers: list[Layer],
        unit_slots: list[GateSlot],
        *,
        droprate_init: float,
        gate_factory: GateFactory | None,
        rngs: nnx.Rngs,
        couplings: tuple[ChannelCoupling, ...] = (),
        kernel_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        """Set ``layers``, ``channel_couplings`` and the gate slots (``unit_slots`` at unit
        granularity, one weight slot per kernel otherwise, :func:`weight_slots` with
        ``kernel_shapes``), then build the gates."""
        self.layers = tuple(layers)
        self.channel_couplings = couplings
        unit = self.granularity == "unit"
        self.gate_slots = (
            tuple(unit_slots) if unit else weight_slots(self.layers, droprate_init, kernel_shapes)
        )
        self._build_gates(gate_factory, rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool,
        rngs: nnx.Rngs | None = None,
        gates: dict[str, jax.Array] | None = None,
    ) -> jax.Array:
        """The logits of the batch ``x``. ``gates`` maps slot names to explicit gate values (used
        by ARM to evaluate the same network on the antithetic gates); slots not given there are
        drawn by their gate module from ``rngs`` (training) or take its test-time value
        (evaluation)."""
        z = self.gate_values(x.shape[0], train=train, rngs=rngs, gates=gates)
        return self.forward(x, z, train=train)

    def forward(self, x: jax.Array, z: dict[str, jax.Array], *, train: bool) -> jax.Array:
        """The logits of ``x`` with the gate values ``z`` (one entry per gated slot)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, z, *, train)")

    def notes(self) -> tuple[str, ...]:
        """Lines a run shows when it starts: what the model keeps whole that a user may expect
        to be pruned, and why. Empty by default."""
        return ()

    def _build_gates(self, gate_factory: GateFactory | None, rngs: nnx.Rngs) -> None:
        built = {} if gate_factory is None else dict(gate_factory(self.gate_slots, rngs))
        unknown = sorted(set(built) - {slot.name for slot in self.gate_slots})
        if unknown:
            raise ValueError(f"gates built for slots {unknown}, which the model does not have")
        self.gates = nnx.Dict(built)

    def gate_values(
        self,
        batch_size: int,
        *,
        train: bool,
        rngs: nnx.Rngs | None,
        gates: dict[str, jax.Array] | None,
    ) -> dict[str, jax.Array]:
        """Values of every gated slot for this forward pass."""
        given = gates or {}
        return {
            name: given[name]
            if name in given
            else gate(train=train, rngs=rngs, batch_size=batch_size)
            for name, gate in self.gates.items()
        }

    def layer_module(self, name: str) -> nnx.Module:
        """The module (or the parameters) holding the kernel and bias of the layer ``name``."""
        raise NotImplementedError(f"{type(self).__name__} must implement layer_module(name)")

    def slot_members(self, slot: GateSlot) -> tuple[SlotMember, ...]:
        """The parameter entries a gate of ``slot`` removes, unit by unit. Default: the slot's
        layer's kernel along ``slot.axis`` (every entry at weight granularity), and its bias
        when the gates scale it. Models whose gates span several layers (transformer heads,
        the hidden dimension) override it."""
        kernel = SlotMember(f"{slot.layer}.kernel", slot.axis)
        bias = getattr(self.layer_module(slot.layer), "bias", None)
        if slot.gates_bias and slot.axis is not None and bias is not None:
            return (kernel, SlotMember(f"{slot.layer}.bias", 0))
        return (kernel,)

    def scale_units(self, slot: GateSlot, factors: jax.Array) -> None:
        """Multiply every entry of unit j of ``slot`` by ``factors[j]``, in place, so that a 0
        removes the unit from every parameter it spans. The default scales the slot's members
        (:meth:`slot_members`, layer or not); models that know more of what a unit takes along
        override it."""
        for member in self.slot_members(slot):
            variable = self.parameter(member.path)
            value = variable[...]
            variable[...] = value * per_unit(member, factors, value.shape).astype(value.dtype)

    def parameter(self, path: str) -> nnx.Variable:
        """The parameter at a :class:`SlotMember` path: ``"{layer or module path}.{name}"``, or
        a bare name for a parameter of the model itself."""
        owner, _, name = path.rpartition(".")
        if not owner:
            return getattr(self, name)
        is_layer = any(layer.name == owner for layer in self.layers)
        return getattr(self.layer_module(owner) if is_layer else self.module_at(owner), name)

    def module_at(self, path: str) -> nnx.Module:
        """The submodule at a dotted attribute path; numbers index lists (``"blocks.0.bn1"``)."""
        module = self
        for part in path.split("."):
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        return module


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")

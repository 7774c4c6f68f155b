"""What the analysis knows about each variable of a jaxpr, and the context the rules write to."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sparsejax.structure.trace.units import (
    NO_UNIT,
    Blocker,
    Field,
    Seed,
    UnitTable,
    join_positions,
)


@dataclasses.dataclass(frozen=True)
class Value:
    """The fields of a variable; ``param``: the parameter it is (up to casts, reshapes and
    broadcasts), else None; ``layer``: the index of the layer whose output it is, else None;
    ``constant``: dimensions along which it is known to be constant (a broadcast);
    ``sources``: when it depends on no model input and on no product, the parameters it is
    computed from (none for a constant), else None; ``tags``: the query-head tags of its
    positions (:mod:`.tags`), fields of tag ids rather than unit ids."""

    fields: tuple[Field, ...] = ()
    param: str | None = None
    layer: int | None = None
    constant: frozenset[int] = frozenset()
    sources: frozenset[str] | None = None
    tags: tuple[Field, ...] = ()


UNLABELLED = Value()
CONSTANT = Value(sources=frozenset())
"""A literal or a constant of the program: no units, no input."""

@dataclasses.dataclass(frozen=True)
class Joint:
    """A cost factor over positions that unit ids and query-head tags share (the scores of a
    query head: its positions hold the shared key's units and the head's tag): ``ids``, one
    array of unit ids per field, and ``tags``, of one shape. Its kept value is the sum over the
    positions of the product of their units' values (and, where gates act on the tags, of the
    tags' values)."""

    ids: tuple[np.ndarray, ...]
    tags: np.ndarray

    @property
    def size(self) -> int:
        return int(self.tags.size)


Factor = int | np.ndarray | Joint
"""A factor of a cost: a fixed size, unit ids whose kept values are summed (-1 counts 1), or a
:class:`Joint` of units and tags."""


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """A convolution or matrix product that reads a parameter as its kernel (``kind`` "conv" or
    "dense"), or a lookup of a parameter table's rows (``kind`` "lookup": an embedding, a
    product with one-hot rows that costs no multiply-accumulates).

    ``macs`` are the factors whose product is its multiply-accumulates over the traced batch;
    ``bias`` the parameter added to its output, if any; ``reparametrised`` whether the product
    reads a kernel computed from ``kernel`` (weight standardisation or normalisation) rather
    than the parameter itself."""

    kernel: str
    kind: str
    macs: tuple[Factor, ...]
    bias: str | None = None
    reparametrised: bool = False


@dataclasses.dataclass
class Frame:
    """The values of one walk of a jaxpr (``env``: variable -> :class:`Value`), and the frames
    of the sub-jaxprs it walked into, in the order it met them (a sub-jaxpr called twice is
    walked twice, with its own values each time)."""

    env: dict
    children: list[Frame] = dataclasses.field(default_factory=list)


class PositionLinks:
    """Unit ids that label the same position of one array (the operands of a sum, each on its
    own units: a rotary embedding's two halves of a query head): a union-find over ids, apart
    from the merging of units (which also ties positions of different arrays, such as every
    query head's feature j to the shared key's)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, unit: int) -> int:
        parent = self.parent
        root = unit
        while parent.get(root, root) != root:
            root = parent[root]
        while unit != root:
            parent[unit], unit = root, parent.get(unit, unit)
        return root

    def merge(self, a: np.ndarray, b: np.ndarray) -> None:
        """Link the ids of ``a`` and ``b`` position by position (arrays of one shape)."""
        join_positions(self.find, self.parent, a, b)

    def copy(self) -> PositionLinks:
        """An independent copy."""
        links = PositionLinks()
        links.parent = dict(self.parent)
        return links


class Context:
    """The state of one analysis: the unit table, the layers found, the other products' costs
    and the heads they split units into, the unit ids of the model's parameters (per axis; a
    size for an axis of one), the equation being read (named by blockers), and the frames of the
    walks (``root``, the outermost, with the ``stack`` of those in progress). For query heads
    (:mod:`.tags`): the ``links`` of unit ids at the same positions, the number of tags made
    and the ``tagged`` unit ids, ``(ids, tags)`` arrays of one shape."""

    def __init__(self) -> None:
        self.units = UnitTable()
        self.root: Frame | None = None
        self.stack: list[Frame] = []
        self.layers: list[LayerRecord] = []
        self.lookup_units: dict[int, np.ndarray] = {}
        self.other_macs: list[tuple[Factor, ...]] = []
        self.head_splits: list[np.ndarray] = []
        self.param_ids: dict[str, tuple[np.ndarray | int, ...]] = {}
        self.links = PositionLinks()
        self.tag_count = 0
        self.tagged: list[tuple[np.ndarray, np.ndarray]] = []
        self.primitive = ""
        self.source = ""

    def block(self, fields: tuple[Field, ...] | list[Field], reason: str) -> None:
        """Keep the units of ``fields`` from being removed because of the current equation."""
        for field in fields:
            self.units.block(field.ids, Blocker(self.primitive, self.source, reason))

    def warn(self, fields: tuple[Field, ...] | list[Field], reason: str) -> None:
        """Record that removing the units of ``fields`` changes the current equation's value
        beyond dropping their terms."""
        for field in fields:
            self.units.warn(field.ids, Blocker(self.primitive, self.source, reason))

    def opaque(self, axis: int, size: int, reason: str) -> Field:
        """A field of fresh blocked units on dimension ``axis``: an output dimension whose width
        the current equation fixes (whatever meets it is blocked too)."""
        ids = self.units.new_units(Seed(self.primitive, axis, size, opaque=True))
        field = Field((axis,), ids)
        self.block([field], reason)
        return field

    def merge_fields(self, fields: list[Field]) -> tuple[Field, ...]:
        """Fields of one array from several operands: fields on the same dimensions merge their
        units position by position; fields that overlap on some dimensions only are blocked (one
        position cannot belong to two units) and dropped."""
        out: list[Field] = []
        for field in fields:
            for i, other in enumerate(out):
                if other.dims == field.dims:
                    self.units.merge(other.ids, field.ids)
                    self.links.merge(other.ids, field.ids)
                    ids = np.where(other.ids == NO_UNIT, field.ids, other.ids)
                    out[i] = Field(other.dims, ids)
                    break
                if set(other.dims) & set(field.dims):
                    self.block([other, field], "unit labellings overlap on some dimensions")
                    out.pop(i)
                    break
            else:
                out.append(field)
        return tuple(out)

    def new_tags(self, shape: tuple[int, ...]) -> np.ndarray:
        """Fresh query-head tags, one per position of ``shape`` (C order)."""
        tags = np.arange(self.tag_count, self.tag_count + int(np.prod(shape)), dtype=np.int64)
        self.tag_count += tags.size
        return tags.reshape(shape)

    def split_heads(self, fields: tuple[Field, ...], batch_dims: tuple[int, ...]) -> None:
        """Record the heads a product of two activations splits units into: a field on some
        of the product's batch dimensions and on others holds, at each position of the batch
        dimensions, one head's units (a flat projection reshaped into heads); kept as
        ``(heads, units per head)`` unit ids."""
        for field in fields:
            axes = [k for k, d in enumerate(field.dims) if d in batch_dims]
            if axes and len(axes) < len(field.dims):
                ids = np.moveaxis(field.ids, axes, list(range(len(axes))))
                self.head_splits.append(ids.reshape(int(np.prod(ids.shape[:len(axes)])), -1))

    def param_shape(self, path: str) -> tuple[int, ...] | None:
        """The shape of the model's parameter ``path`` (None if it is no parameter)."""
        ids = self.param_ids.get(path)
        return None if ids is None else tuple(i if isinstance(i, int) else i.size for i in ids)

    def mark_param_producers(self, path: str, axes: Sequence[int]) -> None:
        """The units of the model's parameter ``path`` along ``axes`` produce features."""
        for axis in axes:
            ids = self.param_ids[path][axis]
            if not isinstance(ids, int):
                self.units.mark_producers(ids)

    def add_layer(self, record: LayerRecord) -> int:
        self.layers.append(record)
        return len(self.layers) - 1

    def add_lookup(self, table: str, ids: np.ndarray) -> None:
        """A lookup of the rows of parameter ``table`` whose units ``ids`` (the features every
        row holds) it produces."""
        self.units.mark_producers(ids)
        self.lookup_units[self.add_layer(LayerRecord(table, "lookup", (0,)))] = ids

    def counted_layers(self) -> list[LayerRecord]:
        """The layers in network order: a table that a product also reads (a tied embedding)
        is that product's layer, counted where the table is first looked up (its lookups'
        units produce nothing), and a table's lookups after its first are no layers."""
        products = {layer.kernel: layer for layer in self.layers if layer.kind != "lookup"}
        kept: list[LayerRecord] = []
        for index, layer in enumerate(self.layers):
            if layer.kind == "lookup" and layer.kernel in products:
                self.units.unmark_producers(self.lookup_units[index])
                layer = products[layer.kernel]  # a tied table: its product's layer, here
            elif layer.kind == "lookup" and any(k.kernel == layer.kernel for k in kept):
                continue  # a table looked up again
            if all(k is not layer for k in kept):
                kept.append(layer)
        return kept


def field_on(value: Value, dims: tuple[int, ...]) -> Field | None:
    """The field of ``value`` exactly on ``dims``, if any."""
    return next((f for f in value.fields if f.dims == dims), None)


def factors(value: Value, dims: list[int], shape: tuple[int, ...]) -> list[Factor]:
    """The cost factors of the dimensions ``dims`` of ``value``: the ids of each field that lies
    inside them, and the sizes of the dimensions that no such field covers. A product's cost is
    the product of its operands' factors, each dimension counted on one side: the side whose
    fields label it, so that a removed unit removes its multiply-accumulates."""
    out: list[Factor] = []
    covered: set[int] = set()
    for field in value.fields:
        if set(field.dims) <= set(dims):
            out.append(field.ids)
            covered |= set(field.dims)
    out.append(int(np.prod([shape[d] for d in dims if d not in covered], dtype=np.int64)))
    return out

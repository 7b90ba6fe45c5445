"""What a stage needs to know about an ONNX graph, read once: a small summary passed between its steps.

A 1.6 GB ViT-L ONNX used to be parsed by almost every step of a stage (op census, external-data files, forbidden
ops, node names for the precision policy, the input shape for the range pass...). A stage now reads the graph once
(or takes it from the ``ModelProto`` it has just written), keeps a :class:`GraphSummary` (names, types, counts: a
few hundred KB even for ViT-L) and hands that to the next step. The summary never holds weights. ``onnx`` is imported
only inside the functions that need it.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

Dim = Union[int, str, None]  # a fixed size, a symbolic name, or unknown


@dataclass(frozen=True)
class ValueSpec:
    """A graph input or output: name, ONNX element type (``onnx.TensorProto`` enum) and shape."""

    name: str
    elem_type: int
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class GraphSummary:
    """One ONNX model's graph in brief (main graph; no weights).

    ``nodes`` are ``(name, op_type)`` in graph order. ``initializer_bytes`` counts the weights' data, inline or in
    external-data files (their ``length``); ``external_data`` lists the locations of every external-data file the
    model refers to (see :func:`external_data_locations`), so that a copy made from it misses none.
    """

    inputs: tuple[ValueSpec, ...]
    outputs: tuple[ValueSpec, ...]
    nodes: tuple[tuple[str, str], ...]
    initializer_count: int
    initializer_bytes: int
    external_data: tuple[str, ...]
    opset: int
    ir_version: int

    @property
    def op_census(self) -> dict[str, int]:
        """Count of nodes per op type (sorted by op type)."""
        return dict(sorted(Counter(op for _, op in self.nodes).items()))

    @property
    def node_count(self) -> int:
        return len(self.nodes)

    def input(self, name: str) -> Optional[ValueSpec]:
        """The graph input called ``name``, or None."""
        return next((i for i in self.inputs if i.name == name), None)

    def ops(self, *op_types: str) -> list[str]:
        """Names of the nodes of the given op types, in graph order."""
        wanted = set(op_types)
        return [n for n, op in self.nodes if op in wanted]

    @classmethod
    def from_proto(cls, proto) -> "GraphSummary":
        """The summary of an in-memory ``onnx.ModelProto`` (with or without its weights loaded)."""
        g = proto.graph
        total = sum(tensor_data_bytes(init) for init in g.initializer)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        return cls(
            inputs=tuple(_value_spec(v) for v in g.input),
            outputs=tuple(_value_spec(v) for v in g.output),
            nodes=tuple((n.name, n.op_type) for n in g.node),
            initializer_count=len(g.initializer),
            initializer_bytes=total,
            external_data=tuple(sorted(external_data_locations(proto))),
            opset=int(opset),
            ir_version=int(proto.ir_version),
        )

    def to_dict(self) -> dict:
        return {"nodes": self.node_count, "op_census": self.op_census, "initializers": self.initializer_count,
                "initializer_bytes": self.initializer_bytes, "external_data": list(self.external_data),
                "opset": self.opset, "ir_version": self.ir_version}


@dataclass(frozen=True)
class WrittenOnnx:
    """An ONNX file a stage has just written: its sha256 (hashed while writing), summary and external-data files,
    so that the manifest needs no second read of it."""

    path: Path
    sha256: str
    summary: GraphSummary
    external_data: tuple[str, ...]


def read_graph(path: str | os.PathLike):
    """``(proto, summary)`` of the ONNX file ``path``: its graph parsed once, weights left in their external-data
    files (a self-contained file still parses its inline weights)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return proto, GraphSummary.from_proto(proto)


def read_summary(path: str | os.PathLike) -> GraphSummary:
    """The :class:`GraphSummary` of the ONNX file ``path`` (one parse; the graph is not kept)."""
    return read_graph(path)[1]


def tensor_data_bytes(t) -> int:
    """Bytes of a ``TensorProto``'s data: its external ``length``, its ``raw_data``, or its typed fields."""
    if t.data_location == 1:  # TensorProto.EXTERNAL
        for e in t.external_data:
            if e.key == "length":
                return int(e.value)
        return 0
    if t.raw_data:
        return len(t.raw_data)
    for name, item in (("float_data", 4), ("int32_data", 4), ("int64_data", 8), ("double_data", 8),
                       ("uint64_data", 8)):
        n = len(getattr(t, name))
        if n:
            return n * item
    return 0


def external_data_locations(proto) -> list[str]:
    """The ``location`` of every external-data tensor of an ONNX ``ModelProto``, in the order first met: initializers,
    sparse initializers, tensor attributes of nodes, subgraphs (If/Loop/Scan bodies) and local functions."""
    locations: list[str] = []

    def tensor(t) -> None:
        if t.data_location == 1:  # TensorProto.EXTERNAL
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc is not None and loc not in locations:
                locations.append(loc)

    def nodes(node_list) -> None:
        for node in node_list:
            for a in node.attribute:  # AttributeProto types: 4 TENSOR, 5 GRAPH, 9 TENSORS, 10 GRAPHS
                if a.type == 4:
                    tensor(a.t)
                elif a.type == 9:
                    for t in a.tensors:
                        tensor(t)
                elif a.type == 5:
                    graph(a.g)
                elif a.type == 10:
                    for sub in a.graphs:
                        graph(sub)

    def graph(g) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            tensor(s.values)
            tensor(s.indices)
        nodes(g.node)

    graph(proto.graph)
    for f in proto.functions:
        nodes(f.node)
    return locations


def _value_spec(v) -> ValueSpec:
    tt = v.type.tensor_type
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return ValueSpec(v.name, int(tt.elem_type), tuple(dims))

"""Graph rewrites that make a published decoder cheaper to run, without changing what it computes.

Optimum's merged decoders (ViT-GPT2 and other VisionEncoderDecoder exports) recompute the cross-attention keys and
values from ``encoder_hidden_states`` at every generation step, although they depend on the encoder output alone:
for a GPT-2 small decoder over 197 ViT states that is ~2.8 GMAC per step, about half of a step's cost.
:func:`split_invariant` cuts such a graph in two:

* a *cross* graph, run once per image: every node computed from ``encoder_hidden_states`` (and constants) alone;
* a *step* graph, run once per token: the rest, fed the cross graph's results instead of the encoder states.

The ``If`` on ``use_cache_branch`` of a merged decoder is resolved to its cached branch first (step 0 then runs it
with empty pasts): that branch alone is kept, so the rewritten pair holds each weight once.

Shapes are the one subtlety. The step graph may take the ``Shape`` of a tensor that moved to the cross graph (GPT-2
reshapes its heads with ``x.size()``). Feeding the whole tensor just for its shape would double the memory the
cross results take, so such ``Shape`` nodes move to the cross graph too and their results are fed as small int64
tensors whose leading entry (the batch) the caller sets to the number of rows it feeds
(:attr:`SplitGraphs.shape_outputs`); :func:`capwatch.models.derived` checks on a probe that this holds for the graph
at hand before the pair is ever used.

A second rewrite, for dynamically quantised image encoders (:func:`split_before_transpose`), moves a ``Split``
(with the ``Squeeze`` of each part) before the ``Transpose`` that fed it: attention blocks transpose their
``[batch, tokens, 3, heads, dim]`` query/key/value tensor and then split it. onnxruntime turns that into 4-d
transposes of each part in an fp32 graph, but in a dynamic int8 graph it leaves 5-d transposes with a size-1 axis,
which its generic path runs ~20x slower: on Florence-2-base's DaViT encoder 0.72 s of a 2.1 s image on a 2-core
Xeon (bench/vision_encoder.py profile). The parts are the same numbers in the same order either way.

This module needs the ``onnx`` package and is imported only when a rewrite is made.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

#: Operators whose result depends on a tensor's shape only, never its values.
_SHAPE_OPS = frozenset({"Shape"})
#: Operators without inputs that are not constants.
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                               "Multinomial", "Bernoulli"})


class RewriteError(Exception):
    """The graph does not have the form a rewrite needs; the caller keeps the original graph."""


@dataclass(frozen=True)
class SplitGraphs:
    """The result of :func:`split_invariant`.

    ``cross`` maps the source input to ``data_outputs`` (tensors with the batch on axis 0, fed row by row) and
    ``shape_outputs`` (1-D int64 shapes whose entry 0 is the batch). ``step`` has the source graph's inputs minus
    the source (and minus the cache switch), plus all of those outputs by the same names, and the same outputs.
    """

    cross: onnx.ModelProto
    step: onnx.ModelProto
    data_outputs: tuple[str, ...]
    shape_outputs: tuple[str, ...]


def split_invariant(
    model: onnx.ModelProto, source: str = "encoder_hidden_states", cache_switch: str = "use_cache_branch"
) -> SplitGraphs:
    """Split ``model`` into the part computed from ``source`` alone and the rest (see the module docstring).

    A top-level ``If`` on the graph input ``cache_switch`` is replaced by its ``then`` branch (the cached one, as
    Optimum's merged decoders define it). Returns the two graphs; raises RewriteError when the graph has no such
    input, nothing depends on ``source`` alone, or names would clash.
    """
    graph = _resolve_cache_branch(model.graph, cache_switch)
    inputs = {i.name for i in graph.input}
    if source not in inputs:
        raise RewriteError(f"the graph has no input {source!r}")
    constants = {t.name for t in graph.initializer}
    invariant = {source}  # values computed from the source (and constants) alone
    shape_like: set[str] = set()  # invariant values that depend on the source's shape only
    hoisted: list[onnx.NodeProto] = []
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        used = [n for n in _node_inputs(node) if n]
        if _has_subgraph(node) or node.op_type in _NONDETERMINISTIC:
            kept.append(node)
        elif all(n in constants for n in used):
            constants.update(node.output)
            kept.append(node)
        elif all(n in constants or n in invariant for n in used):
            invariant.update(node.output)
            if node.op_type in _SHAPE_OPS or all(n in constants or n in shape_like for n in used):
                shape_like.update(node.output)
                kept.append(node)  # cheap: stays in the step graph (copied into the cross graph where needed)
            else:
                hoisted.append(node)
        else:
            kept.append(node)
    if not hoisted:
        raise RewriteError(f"nothing is computed from {source!r} alone")
    hoisted_values = {o for n in hoisted for o in n.output}

    # Shape nodes of hoisted values move to the cross graph: their results are fed, not the values.
    movable = {id(n) for n in kept if n.op_type in _SHAPE_OPS and n.input[0] in hoisted_values | {source}}
    step_nodes = _closure([n for n in kept if id(n) not in movable], [], {o.name for o in graph.output})
    read = _ordered([*(name for node in step_nodes for name in _node_inputs(node)), *(o.name for o in graph.output)])
    moved_outputs = {o for n in kept if id(n) in movable for o in n.output}
    data_outputs = tuple(name for name in read if name in hoisted_values)
    shape_outputs = tuple(name for name in read if name in moved_outputs)
    for needed in (source, cache_switch):
        if needed in read:
            raise RewriteError(f"the step graph would still need {needed!r} itself")
    types = _value_types(model, graph)

    # The cross graph: what the fed values need, from the source and constants.
    cross_nodes = _closure(list(graph.node), [], set(data_outputs) | set(shape_outputs))
    cross_graph = helper.make_graph(
        cross_nodes, "capwatch_cross",
        [i for i in graph.input if i.name == source],
        [_value_info(name, types) for name in (*data_outputs, *shape_outputs)],
        _used_initializers(graph.initializer, cross_nodes),
    )

    new_inputs = [i for i in graph.input if i.name not in (source, cache_switch)]
    new_inputs += [_value_info(name, types) for name in (*data_outputs, *shape_outputs)]
    step_graph = helper.make_graph(
        step_nodes, "capwatch_step", new_inputs, list(graph.output),
        _used_initializers(graph.initializer, step_nodes),
    )
    return SplitGraphs(_model_like(model, cross_graph), _model_like(model, step_graph), data_outputs, shape_outputs)


def _resolve_cache_branch(graph: onnx.GraphProto, cache_switch: str) -> onnx.GraphProto:
    """``graph`` with a top-level ``If(cache_switch)`` inlined as its then-branch (a copy; ``graph`` is unchanged).

    Raises RewriteError when the branch would redefine a name of the outer graph.
    """
    switch = [n for n in graph.node if n.op_type == "If" and list(n.input) == [cache_switch]]
    if not switch:
        return graph
    if len(switch) > 1:
        raise RewriteError(f"more than one If on {cache_switch!r}")
    branch = next(a.g for a in switch[0].attribute if a.name == "then_branch")
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {o for n in graph.node if n is not switch[0] for o in n.output}
    clash = defined & ({o for n in branch.node for o in n.output} | {t.name for t in branch.initializer})
    if clash:
        raise RewriteError(f"the cached branch redefines {sorted(clash)[0]!r}")
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node is not switch[0]:
            nodes.append(node)
            continue
        nodes.extend(branch.node)
        for outer, inner in zip(node.output, branch.output, strict=True):
            if outer == inner.name:
                continue
            if outer in {o for n in branch.node for o in n.output}:
                raise RewriteError(f"the cached branch redefines {outer!r}")
            nodes.append(helper.make_node("Identity", [inner.name], [outer], name=f"capwatch_out_{outer}"))
    flat = onnx.GraphProto()
    flat.CopyFrom(graph)
    del flat.node[:]
    flat.node.extend(nodes)
    flat.initializer.extend(branch.initializer)
    flat.value_info.extend(branch.value_info)
    return flat


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """The node's inputs, plus the outer-scope names its subgraphs read (If/Loop/Scan bodies)."""
    names = list(node.input)
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            names.extend(_outer_names(sub))
    return names


def _outer_names(graph: onnx.GraphProto) -> Iterator[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        for name in _node_inputs(node):
            if name and name not in local:
                yield name
        local.update(node.output)
    for out in graph.output:
        if out.name not in local:
            yield out.name


def _ordered(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _closure(
    all_nodes: Sequence[onnx.NodeProto], roots: Sequence[onnx.NodeProto], targets: set[str]
) -> list[onnx.NodeProto]:
    """The nodes of ``all_nodes`` (in their order) needed to compute ``targets``, starting from ``roots``' needs."""
    producer = {o: n for n in all_nodes for o in n.output}
    needed: set[int] = set()
    pending = [producer[t] for t in targets if t in producer] + list(roots)
    while pending:
        node = pending.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        pending.extend(producer[n] for n in _node_inputs(node) if n in producer)
    return [n for n in all_nodes if id(n) in needed]


def _used_initializers(initializers: Iterable[onnx.TensorProto], nodes: Sequence[onnx.NodeProto]) -> list[
        onnx.TensorProto]:
    used = {n for node in nodes for n in _node_inputs(node)}
    return [t for t in initializers if t.name in used]


def _value_types(model: onnx.ModelProto, graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Element types (and ranks) of the graph's values, by onnx shape inference on a weightless copy."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    light.graph.CopyFrom(graph)
    for tensor in light.graph.initializer:
        # inference reads shapes and constant values of small tensors; big weights only need their dims
        if tensor.ByteSize() > 4096:
            dims, dtype, name = list(tensor.dims), tensor.data_type, tensor.name
            tensor.Clear()
            tensor.name, tensor.data_type = name, dtype
            tensor.dims.extend(dims)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", "capwatch-absent"
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception as exc:  # onnx raises InferenceError and others
        raise RewriteError(f"shape inference failed: {exc}") from None
    types = {v.name: v.type for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    for tensor in graph.initializer:
        types.setdefault(tensor.name, helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims)))
    return types


def _value_info(name: str, types: dict[str, onnx.TypeProto]) -> onnx.ValueInfoProto:
    """A graph input/output for ``name``: its inferred element type and rank, every dimension left symbolic."""
    known = types.get(name)
    if known is None or not known.HasField("tensor_type") or not known.tensor_type.elem_type:
        raise RewriteError(f"cannot tell the type of {name!r}")
    tensor = known.tensor_type
    if not tensor.HasField("shape"):
        raise RewriteError(f"cannot tell the rank of {name!r}")
    dims = [f"{name}_d{i}" for i in range(len(tensor.shape.dim))]
    return helper.make_tensor_value_info(name, tensor.elem_type, dims)


def _model_like(model: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="capwatch")
    out.ir_version = model.ir_version
    out.functions.extend(model.functions)
    return out


def signed_weights(model: onnx.ModelProto) -> int:
    """Turn the uint8 weights of dynamically quantised MatMuls into int8 ones with the same real values, in place.

    ``MatMulInteger(A, B, a_zero, b_zero)`` computes with ``B - b_zero``: ``B - 128`` with ``b_zero - 128`` is the
    same integer, so the product is unchanged wherever the kernel accumulates without saturation (onnxruntime's
    u8s8 kernels on CPUs with VNNI; on AVX2 without it, ``vpmaddubsw`` may saturate, so the caller decides where to
    use this). Only weights that are initialisers read by nothing but MatMulInteger's B input (with a uint8
    initialiser zero point, or none) are changed, in the graph and its subgraphs (the branches of a merged
    decoder). Returns the number of MatMuls changed; 0 (and nothing changed) when a weight's name is defined twice.
    """
    graphs = list(_graphs(model.graph))
    tensors: dict[str, tuple[onnx.GraphProto, onnx.TensorProto]] = {}
    weights: list[str] = []
    computed: set[str] = set()
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for graph in graphs:
        weights += [t.name for t in graph.initializer]
        computed.update(o for n in graph.node for o in n.output)
        tensors.update({t.name: (graph, t) for t in graph.initializer})
        for node in graph.node:
            for position, name in enumerate(node.input):
                readers.setdefault(name, []).append((node, position))
            for attr in node.attribute:  # names a subgraph reads from this scope count as readers too
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    for name in _outer_names(sub):
                        readers.setdefault(name, []).append((node, -1))
    if len(weights) != len(set(weights)) or computed.intersection(weights):
        return 0  # a shadowed weight: which tensor a reader means would need scope tracking
    changed = 0
    converted: set[str] = set()
    for graph in graphs:
        for node in graph.node:
            if node.op_type != "MatMulInteger" or len(node.input) < 2:
                continue
            weight = tensors.get(node.input[1], (graph, None))[1]
            zero_name = node.input[3] if len(node.input) > 3 else ""
            zero = tensors.get(zero_name, (graph, None))[1] if zero_name else None
            if weight is None or weight.data_type != onnx.TensorProto.UINT8:
                continue
            if zero_name and (zero is None or zero.data_type != onnx.TensorProto.UINT8):
                continue
            names = [weight.name] + ([zero_name] if zero_name else [])
            wanted = {weight.name: 1, zero_name: 3}
            if any(r.op_type != "MatMulInteger" or p != wanted[n] for n in names for r, p in readers[n]):
                continue  # shared with another kind of reader: its meaning would change there
            for name in names:
                if name not in converted:
                    _shift_to_int8(tensors[name][1])
                    converted.add(name)
            if not zero_name:
                offset = f"{weight.name}_capwatch_zero"
                if offset not in tensors:
                    home = tensors[weight.name][0]
                    home.initializer.append(onnx.numpy_helper.from_array(np.array(-128, dtype=np.int8), offset))
                    tensors[offset] = (home, home.initializer[-1])
                inputs = list(node.input) + [""] * (4 - len(node.input))
                inputs[3] = offset
                node.ClearField("input")
                node.input.extend(inputs)
            changed += 1
    return changed


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it, outermost first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from _graphs(sub)


def _shift_to_int8(tensor: onnx.TensorProto) -> None:
    values = onnx.numpy_helper.to_array(tensor).astype(np.int16) - 128
    shifted = onnx.numpy_helper.from_array(values.astype(np.int8), tensor.name)
    tensor.CopyFrom(shifted)


def split_before_transpose(model: onnx.ModelProto) -> int:
    """Rewrite ``Transpose(perm) -> Split(axis a) -> Squeeze(a)`` per part into ``Split(perm[a]) -> Squeeze(perm[a])
    -> Transpose(perm without a)`` per part, in place, in the main graph. Exact: the same values reach the same
    names. Only where the Transpose feeds the Split alone, every part feeds one Squeeze of that axis alone (axes
    constant), and none of them is a graph output. Returns the number of rewrites."""
    graph = model.graph
    opset = _default_opset(model)
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                      for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR})
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    names = {n.name for n in graph.node}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    orphans: set[str] = set()  # the old Squeezes' axes: removed below unless something else reads them
    for transpose in graph.node:
        if transpose.op_type != "Transpose" or transpose.domain not in ("", "ai.onnx"):
            continue
        perm = [int(v) for v in _attribute(transpose, "perm", [])]
        split = _sole_reader(readers, transpose.output[0], "Split", outputs)
        if not perm or split is None:
            continue
        axis = int(_attribute(split, "axis", 0)) % len(perm)
        squeezes = [_sole_reader(readers, part, "Squeeze", outputs) for part in split.output]
        if not all(q is not None and _squeeze_axes(q, constants, len(perm)) == [axis] for q in squeezes):
            continue
        moved = perm[axis]
        rest = [int(p) - (p > moved) for i, p in enumerate(perm) if i != axis]
        axes_name = _unique(f"{transpose.output[0]}_capwatch_axes", names | set(constants))
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([moved], dtype=np.int64), axes_name))
        constants[axes_name] = graph.initializer[-1]
        first = onnx.NodeProto()
        first.CopyFrom(split)
        first.input[0] = transpose.input[0]
        for attr in first.attribute:
            if attr.name == "axis":
                attr.i = moved
        if not any(a.name == "axis" for a in first.attribute):
            first.attribute.append(helper.make_attribute("axis", moved))
        first.ClearField("output")
        first.output.extend(f"{part}_capwatch" for part in split.output)
        nodes = [first]
        for part, squeeze in zip(first.output, squeezes, strict=True):
            assert squeeze is not None
            squeezed = f"{squeeze.output[0]}_capwatch"
            if opset >= 13:
                nodes.append(helper.make_node("Squeeze", [part, axes_name], [squeezed], name=squeeze.name))
            else:
                nodes.append(helper.make_node("Squeeze", [part], [squeezed], name=squeeze.name, axes=[moved]))
            name = _unique(f"{squeeze.name or squeezed}/capwatch_transpose", names)
            names.add(name)
            nodes.append(helper.make_node("Transpose", [squeezed], [squeeze.output[0]], name=name, perm=rest))
            dropped.add(id(squeeze))
            if len(squeeze.input) > 1 and squeeze.input[1]:
                orphans.add(squeeze.input[1])
        # In the Split's place: its other inputs (split sizes) are computed before it, the Squeezes' readers after.
        replaced[id(split)] = nodes
        dropped.add(id(transpose))
    if not replaced:
        return 0
    orphans = {name for name in orphans
               if name not in outputs and all(id(r) in dropped for r in readers.get(name, []))}
    _replace_nodes(graph, replaced, dropped, orphans)
    return len(replaced)


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _sole_reader(readers: dict[str, list[onnx.NodeProto]], name: str, op_type: str,
                 outputs: set[str]) -> onnx.NodeProto | None:
    """The one node reading ``name`` when it is an ``op_type`` of the default domain and ``name`` is not a graph
    output; else None."""
    found = readers.get(name, [])
    if name in outputs or len(found) != 1 or found[0].op_type != op_type or found[0].domain not in ("", "ai.onnx"):
        return None
    return found[0]


def _squeeze_axes(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], rank: int) -> list[int] | None:
    """The axes a Squeeze removes (attribute before opset 13, a constant input since), each in [0, rank); None when
    they are not constant or not given."""
    if len(node.input) > 1 and node.input[1]:
        tensor = constants.get(node.input[1])
        if tensor is None:
            return None
        values = onnx.numpy_helper.to_array(tensor).ravel().tolist()
    else:
        values = list(_attribute(node, "axes", []))
    return sorted(int(v) % rank for v in values) if values else None


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


#: fp32 holds every integer up to 2**24 exactly: a convolution over integers whose partial sums stay within it
#: gives the integer result, whatever order its kernel adds in.
_FLOAT_EXACT = 1 << 24


def convs_in_float(model: onnx.ModelProto) -> int:
    """Run dynamically quantised convolutions as fp32 ``Conv`` over the same integers, in place, in the main graph.

    ``ConvInteger(x_q, W, x_zero, w_zero) -> Cast(to float)`` becomes ``DequantizeLinear(x_q, 1.0, x_zero) ->
    Conv(., W - w_zero as float)``: the same integer products summed in fp32. Each rewritten convolution is exact:
    its weights' L1 norm per output channel times 255 (the widest ``x_q - x_zero``) bounds every partial sum, and
    only those within 2**24 are rewritten. Only grouped convolutions are: onnxruntime's ``ConvInteger`` runs one
    small GEMM per group, its fp32 ``Conv`` has a depthwise kernel (Florence-2-base's DaViT: its 48 depthwise 3x3
    position encodings take 144 ms as ConvInteger, 24 ms as Conv, on a 2-core Zen 4), while a full convolution is
    faster as ConvInteger (its three patch embeddings: 66 ms against 109 ms). Only where the ``ConvInteger``'s
    output feeds one ``Cast`` to float alone, its weights (and weight zero point, scalar or per output channel) are
    initialisers, and neither output is a graph output. Returns the number of convolutions rewritten."""
    graph = model.graph
    if _default_opset(model) < 10:
        return 0  # DequantizeLinear arrived in opset 10
    constants = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}
    names = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | set(constants)
    one = _unique("capwatch_one", names)
    names.add(one)
    centred: dict[tuple[str, str], str] = {}  # (x_q, x_zero) -> the float integers x_q - x_zero
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    weights_in_use: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "ConvInteger" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        if int(_attribute(node, "group", 1)) == 1:
            continue  # a full convolution: onnxruntime's integer GEMM is the faster path
        cast = _sole_reader(readers, node.output[0], "Cast", outputs)
        if cast is None or _attribute(cast, "to", 0) != onnx.TensorProto.FLOAT or cast.output[0] in outputs:
            continue
        inputs = list(node.input) + [""] * (4 - len(node.input))
        weight = constants.get(inputs[1])
        if weight is None or weight.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        values = onnx.numpy_helper.to_array(weight).astype(np.int32)
        if inputs[3]:
            zero_tensor = constants.get(inputs[3])
            if zero_tensor is None:
                continue
            zero = onnx.numpy_helper.to_array(zero_tensor).astype(np.int32)
            if zero.size not in (1, values.shape[0]):
                continue
            values = values - zero.reshape((-1,) + (1,) * (values.ndim - 1))
        if int(np.abs(values).reshape(values.shape[0], -1).sum(axis=1).max(initial=0)) * 255 > _FLOAT_EXACT:
            continue  # a partial sum could round in fp32
        x_zero = inputs[2]
        nodes: list[onnx.NodeProto] = []
        key = (inputs[0], x_zero)
        if key not in centred:
            centred[key] = _unique(f"{inputs[0]}_capwatch_float", names)
            names.add(centred[key])
            name = _unique(f"{node.name or inputs[0]}/capwatch_dequantize", names)
            names.add(name)
            nodes.append(helper.make_node("DequantizeLinear", [inputs[0], one] + ([x_zero] if x_zero else []),
                                          [centred[key]], name=name))
        float_weight = _unique(f"{weight.name}_capwatch_float", names)
        names.add(float_weight)
        graph.initializer.append(onnx.numpy_helper.from_array(values.astype(np.float32), float_weight))
        conv = helper.make_node("Conv", [centred[key], float_weight], [cast.output[0]], name=node.name)
        conv.attribute.extend(a for a in node.attribute
                              if a.name in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"))
        nodes.append(conv)
        replaced[id(node)] = nodes
        dropped.add(id(cast))
        for name in {inputs[1], inputs[3]} - {""}:
            weights_in_use[name] = weights_in_use.get(name, 0) + 1
    if not replaced:
        return 0
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.0, dtype=np.float32), one))
    # The integer weights (and their zero points) go when nothing else reads them: their float copies replace them.
    graph_inputs = {i.name for i in graph.input}  # an old graph may list its initialisers as inputs: those stay
    gone = {name for name, count in weights_in_use.items()
            if name not in outputs and name not in graph_inputs and len(readers.get(name, [])) == count}
    _replace_nodes(graph, replaced, dropped, gone)
    return len(replaced)


def _default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (ai.onnx) operator set ``model`` imports; 0 when none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Every value name of the main graph -> the nodes reading it (subgraphs not looked into)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _replace_nodes(graph: onnx.GraphProto, replaced: dict[int, list[onnx.NodeProto]], dropped: set[int],
                   unused: set[str]) -> None:
    """Rebuild ``graph``'s node list in order: a node whose id is in ``replaced`` gives way to those nodes (in its
    place: its inputs are computed before it, its readers after), one in ``dropped`` goes; and drop the constants
    (initialisers and Constant nodes) named in ``unused``. The ids are of node objects the caller still holds."""
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in replaced:
            nodes += replaced[id(node)]
        elif id(node) not in dropped and not (node.op_type == "Constant" and node.output[0] in unused):
            nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in unused]
    if len(kept) != len(graph.initializer):
        graph.ClearField("initializer")
        graph.initializer.extend(kept)

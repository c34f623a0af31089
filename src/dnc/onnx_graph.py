"""Edits of an exported ONNX graph (``dnc export --format onnx``): the preprocessing in front of the
network, readable dimension names, and the self-description in ``metadata_props``.

:func:`add_preprocessing` prepends ONNX operators that do what :func:`dnc.tasks.preprocessing`
describes, so that the graph takes decoded 8-bit RGB images (``(N, H, W, 3)`` or ``(N, 3, H, W)``,
any ``H`` and ``W``) and a runtime only decodes the image: ``Resize`` (antialiased, as torchvision's
and PIL's), rounded back to 8 bits, a centre crop at torchvision's offsets, then
``(pixel / 255 - mean) / std``. ONNX's antialiased ``Resize`` is not torchvision's (nor PIL's) bit
for bit: shrinking a photo 10-fold, most pixels agree, a few differ by up to ~20 8-bit steps (0.1-0.6
on average), so the class can differ on images near a decision boundary. A runtime that resizes with
PIL (``examples/onnx_predict.py`` without this option) matches torchvision to one step.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np

__all__ = ["LAYOUTS", "add_preprocessing", "preprocessing_model", "set_metadata", "read_metadata", "name_dims"]

LAYOUTS = ("nhwc", "nchw")
_MODES = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}


def _const(name: str, values, dtype=np.int64):
    from onnx import helper, numpy_helper
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, dtype), name))


def _nodes(pre: dict, layout: str, image: str, out: str) -> list:
    """Operators mapping the uint8 input ``image`` to the network's input ``out`` (float NCHW)."""
    from onnx import TensorProto, helper
    n = helper.make_node
    p = "pre_"  # names of their own, not to clash with the network's
    nodes = [n("Transpose", [image], [p + "nchw"], perm=[0, 3, 1, 2]) if layout == "nhwc"
             else n("Identity", [image], [p + "nchw"]),
             n("Cast", [p + "nchw"], [p + "x0"], to=TensorProto.FLOAT)]
    x = p + "x0"
    if pre["resize"] is not None:
        if pre["interpolation"] not in _MODES:
            raise ValueError(f"--with-preprocessing: interpolation {pre['interpolation']!r} has no ONNX Resize mode "
                             f"({', '.join(_MODES)})")
        nodes += [n("Shape", [x], [p + "shape"]), _const(p + "i0", [0]), _const(p + "i2", [2]), _const(p + "i4", [4]),
                  n("Slice", [p + "shape", p + "i0", p + "i2"], [p + "nc"]),
                  n("Slice", [p + "shape", p + "i2", p + "i4"], [p + "hw"])]
        if pre["resize"] == "shorter":  # short side -> S, long side -> int(S * long / short)
            nodes += [_const(p + "S", [pre["size"]]), n("ReduceMin", [p + "hw"], [p + "short"], keepdims=1),
                      n("Mul", [p + "hw", p + "S"], [p + "hwS"]), n("Div", [p + "hwS", p + "short"], [p + "newhw"])]
        elif pre["resize"] == "exact":
            nodes.append(_const(p + "newhw", pre["size"]))
        else:
            raise ValueError(f"--with-preprocessing: resize {pre['resize']!r} is not supported (classification only)")
        mode = _MODES[pre["interpolation"]]
        extra = {"antialias": int(bool(pre["antialias"]))} if mode != "nearest" else {"nearest_mode": "floor"}
        if mode == "cubic":
            extra["cubic_coeff_a"] = -0.5  # torchvision's antialiased bicubic and PIL's
        nodes += [n("Concat", [p + "nc", p + "newhw"], [p + "sizes"], axis=0),
                  n("Resize", [x, "", "", p + "sizes"], [p + "resized"], mode=mode,
                    coordinate_transformation_mode="half_pixel", **extra),
                  n("Round", [p + "resized"], [p + "rounded"]),
                  _const(p + "lo", 0.0, np.float32), _const(p + "hi", 255.0, np.float32),
                  n("Clip", [p + "rounded", p + "lo", p + "hi"], [p + "x1"])]
        x = p + "x1"
        if pre["crop"] is not None:  # top = round((H - h) / 2) with Python's rounding (half to even)
            nodes += [_const(p + "crop", pre["crop"]), _const(p + "two", [2]),
                      n("Sub", [p + "newhw", p + "crop"], [p + "d"]), n("Div", [p + "d", p + "two"], [p + "k"]),
                      n("Mod", [p + "d", p + "two"], [p + "dodd"]), n("Mod", [p + "k", p + "two"], [p + "kodd"]),
                      n("Mul", [p + "dodd", p + "kodd"], [p + "up"]), n("Add", [p + "k", p + "up"], [p + "top"]),
                      n("Add", [p + "top", p + "crop"], [p + "end"]), _const(p + "axes", [2, 3]),
                      n("Slice", [x, p + "top", p + "end", p + "axes"], [p + "x2"])]
            x = p + "x2"
    scale = 255.0 * np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1)
    nodes += [_const(p + "mean", 255.0 * np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1), np.float32),
              _const(p + "std", scale, np.float32),
              n("Sub", [x, p + "mean"], [p + "centred"]), n("Div", [p + "centred", p + "std"], [out])]
    return nodes


def _image_input(name: str, layout: str):
    from onnx import TensorProto, helper
    dims = ["batch", "height", "width", 3] if layout == "nhwc" else ["batch", 3, "height", "width"]
    return helper.make_tensor_value_info(name, TensorProto.UINT8, dims)


def add_preprocessing(proto, pre: dict, layout: str, name: str = "image"):
    """``proto`` (a ``ModelProto`` whose single input is the normalised image batch) with the
    preprocessing ``pre`` (:func:`dnc.tasks.preprocessing`) in front: its input becomes ``name``, uint8
    images in ``layout`` (``"nhwc"`` or ``"nchw"``). Changes ``proto`` in place and returns it."""
    if layout not in LAYOUTS:
        raise ValueError(f"--with-preprocessing {layout!r}: choose one of {', '.join(LAYOUTS)}")
    g = proto.graph
    old = g.input[0].name
    nodes = _nodes(pre, layout, name, old)
    g.input.pop(0)
    g.input.insert(0, _image_input(name, layout))
    body = list(g.node)
    del g.node[:]
    g.node.extend(nodes + body)
    return proto


def preprocessing_model(pre: dict, layout: str, like):
    """A ``ModelProto`` of the preprocessing alone (uint8 ``image`` -> float ``images``), with the IR and
    opset versions of ``like``: to check it against the PyTorch transform."""
    from onnx import TensorProto, helper
    out = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, None, None])
    graph = helper.make_graph(_nodes(pre, layout, "image", "images"), "preprocessing", [_image_input("image", layout)],
                              [out])
    return helper.make_model(graph, opset_imports=list(like.opset_import), ir_version=like.ir_version)


def name_dims(proto, names: Sequence[str]) -> None:
    """Give the symbolic dimensions of the graph's first input readable names (``batch``, ``height``, ...)."""
    rename = {}
    for dim, new in zip(proto.graph.input[0].type.tensor_type.shape.dim, names):
        if dim.dim_param and new:
            rename[dim.dim_param] = new
    for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def set_metadata(proto, meta: dict, key: str = "dnc") -> None:
    """Store ``meta`` as JSON under ``metadata_props[key]`` (replacing an older entry)."""
    for i, prop in reversed(list(enumerate(proto.metadata_props))):
        if prop.key == key:
            del proto.metadata_props[i]
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, json.dumps(meta)


def read_metadata(path, key: str = "dnc") -> dict:
    """The ``dnc export`` description stored in an ONNX file (``{}`` if it has none)."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    return next((json.loads(p.value) for p in proto.metadata_props if p.key == key), {})

"""The `export` stage: a deploy net and its caffemodel as one ONNX file (emotiw.formats.onnx_export).

The model takes the deploy net's input blob (any batch size, Caffe's channels and image size) and
gives every output blob of the net under its Caffe name (`prob`, and DSN's `prob-dsnK`).
"""

from dataclasses import dataclass
from pathlib import Path

from emotiw.errors import UserError
from emotiw.formats.files import atomic_path
from emotiw.formats.onnx_export import caffe_to_onnx, checked_bytes
from emotiw.nets.reference import resolve_net
from emotiw.output import output_file


@dataclass
class ExportResult:
    """What `export` wrote: the .onnx file, its opset, node count, and the graph's inputs and
    outputs as {name: shape} ("N" for the batch)."""
    onnx: Path
    opset: int
    nodes: int
    inputs: dict
    outputs: dict


def _shapes(values):
    return {value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
            for value in values}


def export(net, weights, onnx, opset=17) -> ExportResult:
    """Converts a deploy net with its trained weights to ONNX.

    net: a registered name (prototxt/NAME/deploy.prototxt) or a deploy prototxt; weights: its
    .caffemodel, which must give every layer with parameters its blobs; onnx: the .onnx file to
    write (atomically); opset: the ONNX operator set (13 or later). Refuses, with one line, a layer
    type that has no conversion and weights made for another net.
    """
    if not Path(weights).is_file():
        raise UserError(f"weights file {weights} not found; pass the trained .caffemodel with --weights")
    deploy = resolve_net(net, "deploy").file
    with output_file(onnx, "export", inputs=[weights, deploy], option="--onnx"):
        model = caffe_to_onnx(deploy, weights, opset)
        data = checked_bytes(model)
        with atomic_path(onnx) as tmp:
            tmp.write_bytes(data)
    return ExportResult(onnx=Path(onnx), opset=opset, nodes=len(model.graph.node),
                        inputs=_shapes(model.graph.input), outputs=_shapes(model.graph.output))

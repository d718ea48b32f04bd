"""`emotiw export NET --weights F --onnx OUT.onnx`: a deploy net and its caffemodel as ONNX (emotiw.stages.export)."""

from pathlib import Path

from emotiw.cli.options import add_weights
from emotiw.stages.export import export


def register(subparsers):
    parser = subparsers.add_parser(
        "export", help="a deploy net with its caffemodel as an ONNX model",
        description="Converts NET's deploy prototxt and FILE into one ONNX model (any batch size; every output "
                    "blob under its Caffe name), checked with onnx's checker against Caffe's blob shapes.")
    parser.add_argument("net", metavar="NET", help="registered net name (prototxt/NAME/deploy.prototxt) "
                                                   "or a deploy prototxt path")
    add_weights(parser)
    parser.add_argument("--onnx", required=True, type=Path, metavar="OUT.onnx", help="the ONNX file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX operator set, 13 or later (default 17)")
    parser.set_defaults(func=run)


def describe(shapes):
    return ", ".join(f"{name} [{', '.join(map(str, dims))}]" for name, dims in shapes.items())


def run(args):
    result = export(args.net, args.weights, args.onnx, opset=args.opset)
    print(f"wrote {result.onnx}: {result.nodes} nodes, opset {result.opset}; input {describe(result.inputs)}; "
          f"outputs {describe(result.outputs)}")
    return 0

"""`emotiw weights report NET --weights F`: which layers of a net a caffemodel initialises;
`emotiw weights fold NET --weights F --out DIR`: the net and weights with BatchNorm and Scale folded."""

from emotiw.caffe.fold import fold_weights
from emotiw.caffe.weights import weights_report
from emotiw.nets.reference import resolve_net


def register(subparsers):
    parser = subparsers.add_parser("weights", help="inspect .caffemodel files against the nets",
                                   description="Inspect .caffemodel files against the registered nets.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    report = actions.add_parser(
        "report", help="which layers of NET a caffemodel initialises",
        description="Lists the layers of NET that FILE initialises (same name and blob shapes), "
                    "the ones left at their filler init, the shape mismatches Caffe would abort on, "
                    "and a one-line verdict. Exit status 0 when Caffe can load the file and it "
                    "initialises at least one layer, 1 when not.")
    report.add_argument("net", metavar="NET", help="registered net name, or a deploy/train prototxt")
    report.add_argument("--weights", required=True, metavar="FILE.caffemodel")
    report.set_defaults(func=run)
    fold = actions.add_parser(
        "fold", help="write NET and its caffemodel with BatchNorm and Scale folded into the convolutions",
        description="Folds every BatchNorm (and the Scale after it) into the Convolution or InnerProduct "
                    "before it and writes DIR/deploy.prototxt and DIR/<FILE's name>, for inference with "
                    "any Caffe (emotiw test and extract already fold in memory). The inputs are not changed.")
    fold.add_argument("net", metavar="NET", help="registered net name, or a deploy prototxt")
    fold.add_argument("--weights", required=True, metavar="FILE.caffemodel")
    fold.add_argument("--out", required=True, metavar="DIR")
    fold.set_defaults(func=run_fold)


def run(args):
    report = weights_report(resolve_net(args.net).param_shapes(), args.weights, args.net)
    print("\n".join(report.lines()))
    return 0 if report.loadable and report.loaded else 1  # NOTHING LOADED is no use either


def run_fold(args):
    ref = resolve_net(args.net)
    chains, prototxt, caffemodel = fold_weights(ref.file, args.weights, args.out, args.net, ref.param_shapes())
    if not chains:
        print(f"nothing to fold in {args.net}: no BatchNorm right after a Convolution or InnerProduct; "
              "nothing written")
        return 0
    scales = sum(chain.scale is not None for chain in chains)
    print(f"folded {len(chains)} BatchNorm and {scales} Scale layers into the layers before them: "
          f"wrote {prototxt} and {caffemodel}")
    return 0

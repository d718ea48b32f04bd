"""`emotiw weights report NET --weights F`: which layers of a net a caffemodel initialises."""

from emotiw.caffe.weights import weights_report


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


def run(args):
    report = weights_report(args.net, args.weights)
    print("\n".join(report.lines()))
    return 0 if report.loadable and report.loaded else 1  # NOTHING LOADED is no use either

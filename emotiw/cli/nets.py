"""`emotiw nets`: write the prototxt files of every registered net, or list the registry."""

from pathlib import Path

from emotiw import nets
from emotiw.errors import UserError
from emotiw.nets.options import NetOptions


def register(subparsers):
    parser = subparsers.add_parser(
        "nets", help="write prototxt/<net>/{train_val,test,deploy,solver}.prototxt or list the nets",
        description="Writes the train_val, test, deploy and solver prototxt of every registered net "
                    "(or of the --net ones) with NetSpec. Options change the generated nets; the "
                    "defaults are the papers' values.")
    parser.add_argument("--out", type=Path, default=Path("prototxt"), help="output folder (default: prototxt)")
    parser.add_argument("--list", action="store_true", help="print the registry, one line per net")
    parser.add_argument("--net", nargs="+", metavar="NAME", help="only these nets")
    add_net_options(parser)
    parser.set_defaults(func=run)


def add_net_options(parser):
    """The NetOptions flags, shared with the commands that write nets for a run."""
    group = parser.add_argument_group("net options (default: the paper's value for each net)")
    group.add_argument("--num-classes", type=int, default=7)
    group.add_argument("--input-size", type=int, help="crop / input side in pixels")
    group.add_argument("--resize", type=int, help="side the data layer resizes images to before cropping")
    group.add_argument("--gray", action="store_true", help="1-channel grayscale input")
    means = group.add_mutually_exclusive_group()
    means.add_argument("--mean-values", type=float, nargs="+", metavar="V", help="BGR means (or one gray mean)")
    means.add_argument("--mean-file", help="mean.binaryproto for the data layers")
    group.add_argument("--train-batch", type=int)
    group.add_argument("--test-batch", type=int)
    group.add_argument("--train-source", help="training list file or LMDB folder")
    group.add_argument("--val-source", help="validation list file or LMDB folder")
    group.add_argument("--source-type", choices=("list", "lmdb"))
    group.add_argument("--holonet-branch-outputs", type=int, choices=(7, 14), default=14,
                       help="outputs of SSE-HoloNet's branch heads (released: 14)")


def net_options(args):
    for flag in ("num_classes", "input_size", "resize", "train_batch", "test_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
    return NetOptions(num_classes=args.num_classes, input_size=args.input_size, resize=args.resize,
                      color=not args.gray, mean_values=tuple(args.mean_values) if args.mean_values else None,
                      mean_file=args.mean_file, train_batch=args.train_batch, test_batch=args.test_batch,
                      train_source=args.train_source, val_source=args.val_source,
                      source_type=args.source_type, holonet_branch_outputs=args.holonet_branch_outputs)


def run(args):
    options = net_options(args)
    selected = [nets.get(name).name for name in args.net] if args.net else nets.names()
    if args.list:
        rows = [describe(nets.get(name), nets.param_count(name, options), options) for name in selected]
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        return 0
    for name in selected:
        nets.write_net(name, args.out / name, options)
        print(f"wrote {args.out / name}/{{{','.join(nets.MODES)},solver}}.prototxt")
    return 0


def describe(entry, params, options):
    """The --list columns: name, recipe (emotiw.recipes; "features" for the classifiers of feature
    vectors), backbone, variant, input size, parameters, released or not."""
    size = options.input_size or entry.preprocessing.input_size
    return [entry.name, entry.recipe or "features", entry.backbone, entry.variant, f"{size}px",
            f"{params / 1e6:7.2f} M params", "released" if entry.released else "ours"]

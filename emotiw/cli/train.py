"""`emotiw train NET --train L --val L --out DIR`: the `caffe train` binary with a progress bar and curves."""

from emotiw.stages.train import train


def register(subparsers):
    parser = subparsers.add_parser("train", help="train a registered net with the caffe train binary")
    parser.add_argument("net", help="registered net name (see `emotiw nets --list`)")
    parser.add_argument("--train", required=True, help="ImageData list or LMDB for training")
    parser.add_argument("--val", required=True, help="ImageData list or LMDB for validation")
    parser.add_argument("--out", required=True, help="output directory (prototxts, log, curves, snapshots)")
    parser.add_argument("--weights", help="caffemodel to fine-tune from (layers matched by name)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest .solverstate in --out")
    parser.add_argument("--max-iter", type=int)
    parser.add_argument("--base-lr", type=float)
    parser.add_argument("--batch-size", type=int, help="training batch size")
    parser.add_argument("--test-batch-size", type=int, help="validation batch size")
    parser.add_argument("--test-interval", type=int)
    parser.add_argument("--test-iter", type=int, help="validation batches per test")
    parser.add_argument("--snapshot", type=int, help="snapshot every N iterations")
    parser.add_argument("--display", type=int, help="log the losses every N iterations")
    parser.add_argument("--input-size", type=int, help="input side in pixels (default: the paper's)")
    parser.add_argument("--num-classes", type=int, default=7, help="number of classes (default 7, AFEW order)")
    parser.add_argument("--mean", help="mean.binaryproto (default: the net's mean values)")
    parser.add_argument("--bn-moving-average-fraction", type=float, metavar="X",
                        help="BatchNorm running-average decay (default: Caffe's 0.999, as released); about "
                             "0.9 for short trainings, whose test nets would otherwise use statistics of "
                             "the first iterations")
    parser.add_argument("--gpu", metavar="all|ID[,ID...]",
                        help="train on GPUs, as caffe train's --gpu: all, 0 or 0,1 (one solver per GPU, each with "
                             "the net's batch size, synchronised with NCCL); needs a CUDA build of Caffe")
    parser.add_argument("--seed", type=int, default=1, help="Caffe's random_seed (default 1)")
    parser.add_argument("--skip-image-check", action="store_true",
                        help="do not decode every listed image before training")
    parser.set_defaults(func=run)


def run(args):
    train(args.net, args.train, args.val, args.out, weights=args.weights, resume=args.resume,
          max_iter=args.max_iter, base_lr=args.base_lr, batch_size=args.batch_size,
          test_batch_size=args.test_batch_size, test_interval=args.test_interval, test_iter=args.test_iter,
          snapshot=args.snapshot, display=args.display, input_size=args.input_size,
          num_classes=args.num_classes, mean=args.mean, bn_moving_average_fraction=args.bn_moving_average_fraction,
          gpu=args.gpu, seed=args.seed, check_images=not args.skip_image_check)
    return 0

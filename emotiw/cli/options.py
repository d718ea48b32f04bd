"""The flags several commands share, declared once so that their names, defaults and help agree."""

import argparse
from pathlib import Path

from emotiw.caffe.runtime import BACKENDS, PRECISIONS
from emotiw.execution.cluster import RAY_HELP
from emotiw.face.clip import DETECT_MODES
from emotiw.formats.images import MAX_MEGAPIXELS
from emotiw.recipes import ALIGNMENTS, NO_RECIPE, RECIPES


def add_net(parser, mode):
    """--net: a registered name or a prototxt of the given mode (deploy, test)."""
    parser.add_argument("--net", required=True, help=f"registered net name (prototxt/NAME/{mode}.prototxt) "
                                                      f"or a {mode}.prototxt path")


def add_weights(parser, help="its trained .caffemodel"):
    parser.add_argument("--weights", required=True, type=Path, metavar="FILE.caffemodel", help=help)


def add_recipe(parser, help, old_spelling, none=False, default=None):
    """--recipe (emotiw.recipes), with the flag's earlier name still accepted, unlisted."""
    choices = (*RECIPES, NO_RECIPE) if none else tuple(RECIPES)
    parser.add_argument("--recipe", choices=choices, default=default, help=help)
    parser.add_argument(old_spelling, dest="recipe", choices=choices, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_backend(parser):
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="pycaffe, opencv (OpenCV DNN) or auto (default): the one `make bench` measured faster "
                             "for the net (pycaffe for nets outside the registry)")


def add_precision(parser):
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 (default), or bf16: the convolutions' inputs and weights in bfloat16 on oneDNN, "
                             "summed in fp32, 1.2-1.8x faster at batch 32 (bench/NOTES.md); needs a CPU with "
                             "AVX512-BF16 or AMX and a CPU build of Caffe, not --backend opencv (probabilities "
                             "within about 2e-2 of fp32)")


def add_allow_partial(parser, verb):
    parser.add_argument("--allow-partial", action="store_true",
                        help=f"{verb} even when the weights leave layers at their random filler init "
                             "(refused by default: a truncated caffemodel still loads)")


def add_fold(parser, what):
    parser.add_argument("--no-fold", dest="fold", action="store_false",
                        help="run BatchNorm and Scale as layers of their own instead of folding them into the "
                             f"convolution before them (the same {what} within 1e-5, slower)")


def add_ray(parser):
    parser.add_argument("--ray", nargs="?", const=True, metavar="ADDRESS", help=RAY_HELP)


def add_detect(parser):
    parser.add_argument("--detect", choices=DETECT_MODES, default="tracked",
                        help="tracked (default): full MTCNN at shot starts and every --redetect-every frames, "
                             "around the previous faces between; every-frame: full MTCNN on every frame")


def add_sampling(parser):
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=float, help="keep N frames per second")
    sampling.add_argument("--every", type=int, metavar="K", help="keep every K-th frame")


def add_mean_file(parser):
    parser.add_argument("--mean-file", type=Path, metavar="FILE",
                        help="the mean.binaryproto a net's data layer subtracts (default: the file its test.prototxt "
                             "names, looked for in the working directory, then in the repository). Of the "
                             "registered nets, SSE's HoloNet nets name the authors' "
                             "data/EmotiW_3_norm/EmotiW_3_norm_mean.binaryproto and SSE's ResNet-50 nets "
                             "models/EmotiW2017/ResNet_mean.binaryproto, neither of them released: give the mean "
                             "of your training data (`emotiw preprocess --lmdb` writes one); the others subtract "
                             "mean values and need no file")


def add_max_pixels(parser):
    parser.add_argument("--max-pixels", type=float, metavar="MEGAPIXELS",
                        help=f"largest image or video frame to decode, in megapixels (default {MAX_MEGAPIXELS:g}); "
                             "larger ones are refused from their header, before they take memory")


def add_align(parser):
    parser.add_argument("--align", choices=ALIGNMENTS,
                        help="how a face becomes a crop (default: the recipe's): facenet (the box with a margin), "
                             "similarity (5 points onto a template), frontal (MediaPipe's face mesh on Caffe and "
                             "its canonical head, seen from the front; adds yaw, pitch, roll to the outputs)")


def add_min_face(parser):
    parser.add_argument("--min-face", metavar="PX|P%",
                        help="the smallest face to find: source pixels (48) or a share of the frame's short side "
                             "(5%%); default: facenet's 20 px at a 360-pixel short side, scaled with the frame (60 px at 1080p), "
                             "so detection costs the same at any resolution; frames are searched scaled down "
                             "to where that face is 20 px, crops still come from full-size frames")

"""The demo's report: OUT/report.md with the accuracy table, the training curves, the confusion
matrices and the commands that made them, from the files a finished Demo run left in its work folder."""

import csv
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS
from emotiw.demo.data import SPLITS
from emotiw.demo.pipeline import DESCRIPTORS, EVALUATED, read_json
from emotiw.face.video import iter_frames
from emotiw.formats.files import atomic_path, atomic_write_text
from emotiw.metrics import classification_metrics, plot_confusion


def percent(value):
    return "-" if value is None else f"{100 * value:.1f}"


WEIGHTINGS = {"searched": "weights searched on val", "sse": "SSE's weights 1/1/1/4/7"}
DESCRIPTOR_TITLES = {"audio": "audio: openSMILE eGeMAPSv02", "lbptop": "hand-crafted: LBP-TOP"}


def fusion_confusion(demo, weighting):
    """Confusion matrix of the fused test predictions (predictions.csv of `emotiw fuse`)."""
    with open(demo.fusion_dir(weighting) / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(row["label"]) for row in rows])
    predictions = np.array([int(row["prediction"]) for row in rows])
    return classification_metrics(labels, predictions)["confusion_matrix"]


def copy_figures(demo):
    """The report's PNGs beside it: training curves, test confusion matrices, sample frames."""
    figures = {}
    for model in demo.models:
        figures[f"curves_{model}"] = shutil.copyfile(demo.train_dir(model) / "curves.png",
                                                     demo.out / f"curves_{model}.png")
        figures[f"confusion_{model}"] = shutil.copyfile(demo.test_dir(model, "test") / "confusion.png",
                                                        demo.out / f"confusion_{model}_test.png")
    for weighting, title in WEIGHTINGS.items():
        fusion = read_json(demo.fusion_dir(weighting) / "fusion.json")
        path = demo.out / f"confusion_fusion_{weighting}_test.png"
        plot_confusion(fusion_confusion(demo, weighting), path,
                       f"fusion, {title}: test accuracy {fusion['test']['fusion']:.4f}")
        figures[f"confusion_fusion_{weighting}"] = path
    figures["samples"] = plot_samples(demo, demo.out / "samples.png")
    return figures


def plot_samples(demo, path):
    """One test clip per class: its middle frame and the aligned face crops of its frames."""
    import cv2
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 1.6 * len(EMOTIONS)))
    grid = figure.subplots(len(EMOTIONS), 2, gridspec_kw={"width_ratios": [1, 2.2]}, squeeze=False)
    for row, emotion in enumerate(EMOTIONS):
        clip = sorted((demo.data / "test" / emotion).glob("*.mp4"))[0]
        frames = [frame.image for frame in iter_frames(clip)]
        crops = sorted((demo.faces / "faces" / "test" / clip.stem).glob("*.png"))
        strip = [cv2.cvtColor(cv2.imread(str(crop)), cv2.COLOR_BGR2RGB) for crop in crops]
        grid[row, 0].imshow(frames[len(frames) // 2])
        if strip:
            grid[row, 1].imshow(np.hstack(strip))
        grid[row, 0].set_ylabel(emotion)
        for axes in grid[row]:
            axes.set_xticks([])
            axes.set_yticks([])
    grid[0, 0].set_title("a test clip (middle frame)", fontsize="small")
    grid[0, 1].set_title("its aligned faces (emotiw preprocess --mode sse)", fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    return path


def accuracy_table(demo):
    """Rows (name, val, test, val from .mat, test from .mat, searched weight, SSE weight); the .mat
    columns are None for the descriptor models, which have no frames to extract, and the weights
    None for the fusion rows."""
    fused = {weighting: read_json(demo.fusion_dir(weighting) / "fusion.json") for weighting in WEIGHTINGS}
    searched = fused["searched"]
    rows = []
    for index, model in enumerate(demo.models):
        tested = {split: read_json(demo.test_dir(model, split) / "metrics.json")["accuracy"] for split in EVALUATED}
        mat = ((None, None) if model in DESCRIPTORS else
               (searched["validation"]["models"][index], searched["test"]["models"][index]))
        rows.append((model, tested["val"], tested["test"], *mat, searched["models"][index]["unit_weight"],
                     fused["sse"]["models"][index]["unit_weight"]))
    for weighting in WEIGHTINGS:
        fusion = fused[weighting]
        rows.append((f"fusion ({weighting})", fusion["validation"]["fusion"], fusion["test"]["fusion"],
                     None, None, None, None))
    return rows


def tested_backends(demo):
    """The backends `emotiw test --backend auto` ran, from the metrics it wrote."""
    names = {"pycaffe": "pycaffe", "opencv": "OpenCV DNN"}
    used = {read_json(demo.test_dir(net, split) / "metrics.json")["config"]["backend"]
            for net in demo.config.nets for split in EVALUATED}
    return " and ".join(names[backend] for backend in sorted(used))


def data_summary(demo):
    with open(demo.data / "clips.csv", newline="") as handle:
        clips = list(csv.DictReader(handle))
    summary = read_json(demo.faces / "summary.json")  # of the last preprocess call; counts come from the lists
    scored = {split: len(demo.video_list(split).read_text().splitlines()) for split in SPLITS}
    frames = {split: len(demo.frame_list(split).read_text().splitlines()) for split in SPLITS}
    made = {split: sum(row["split"] == split for row in clips) for split in SPLITS}
    identities = sorted({row["identity"] for row in clips})
    return made, scored, frames, identities, summary


def weight_cell(weight):
    return "-" if weight is None else f"{weight:.2f}"


def write_report(demo):
    demo.out.mkdir(parents=True, exist_ok=True)
    timings = read_json(demo.work / "timings.json")
    figures = copy_figures(demo)
    rows = accuracy_table(demo)
    made, scored, frames, identities, _ = data_summary(demo)
    c = demo.config
    chance = 1 / len(EMOTIONS)

    def image(key, alt):
        return f"![{alt}]({Path(figures[key]).name})"

    lines = [
        "# emotiw demo",
        "",
        f"Written by `emotiw demo` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"work folder `{demo.work}`. Everything ran on the CPU with real BVLC Caffe.",
        "",
        "## Accuracy (per clip, 7 classes, chance = %.1f %%)" % (100 * chance),
        "",
        "| model | val % | test % | val % (.mat) | test % (.mat) | weight (searched) | weight (SSE) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, val, tested, val_mat, test_mat, weight, sse_weight in rows:
        if name.startswith("fusion"):
            name = f"**{name}**: {WEIGHTINGS[name[len('fusion ('):-1]]}"
        else:
            name = f"`{name}`" + (f" ({DESCRIPTOR_TITLES[name]}, `{demo.net_of(name)}`)" if name in DESCRIPTORS else "")
        lines.append(f"| {name} | {percent(val)} | {percent(tested)} | {percent(val_mat)} | {percent(test_mat)} | "
                     f"{weight_cell(weight)} | {weight_cell(sse_weight)} |")
    lines += [
        "",
        f"val % and test %: `emotiw test` (the CNNs: {tested_backends(demo)}, deploy net, mean of the frame "
        "probabilities per clip; the audio and LBP-TOP models: their Caffe classifier on the clip's "
        "descriptor vector, standardised with the training statistics). "
        "The .mat columns: the CNNs' `prob` extracted by Caffe's `extract_features` into LevelDB, "
        "converted by leveldb2mat (`video_feats`: per-clip means) and scored by `emotiw fuse`. "
        "Fusion: the weighted mean of the four models' scores (the CNNs' .mat, the others' predictions.csv), "
        "with weights searched on val and applied to test, and with SSE's submitted weights: "
        "SSE fused three CNNs (1 each), its hand-crafted model (4) and its audio model (7); here the two "
        "CNNs take weight 1 each, LBP-TOP 4 and audio 7. Weights are shown normalised to sum 1.",
        "",
        "## Data",
        "",
        f"`emotiw demo-data` made {sum(made.values())} clips ({', '.join(f'{s} {made[s]}' for s in SPLITS)}) of "
        f"{c.frames} frames at {c.frame_size[0]}x{c.frame_size[1]} from {len(identities)} faces that "
        f"scikit-image ships ({', '.join(identities)}), expression strength {c.strength}, each with a "
        "sentence spoken by espeak-ng in its identity's voice at the class's pitch, rate and loudness "
        "(docs/demo.md). "
        f"MTCNN found the face in {', '.join(f'{frames[s]} frames of {scored[s]} {s} clips' for s in SPLITS)}; "
        "clips without any face are not scored. Crops: `sse` mode (5-point similarity), "
        f"{c.face_size}x{c.face_size}.",
        "",
        image("samples", "one test clip per class and its aligned faces"),
        "",
        "## Training",
        "",
        f"Each net from scratch: {c.max_iter} iterations, batch {c.batch_size}, input {c.face_size}x{c.face_size}, "
        "the released HoloNet solver otherwise (SGD, base_lr 0.01, momentum 0.9). Validation accuracy in "
        "the curves is per frame, with batch statistics (see docs/demo.md).",
        "",
    ]
    for net in c.nets:
        lines += [f"### `{net}`", "", image(f"curves_{net}", f"training curves of {net}"), ""]
    lines += [
        "### The audio and LBP-TOP models",
        "",
        "Each clip's sound (a sentence spoken by espeak-ng, in the class's pitch, rate and loudness) gives "
        "88 openSMILE eGeMAPSv02 functionals; its aligned face crops, gray at 64x64, give LBP-TOP "
        f"histograms. `{c.audio_net}` and `{c.lbptop_net}` learn them from the train clips with "
        f"`caffe train`, {c.descriptor_max_iter} iterations, batch 32, standardised with the train mean and std.",
        "",
    ]
    for kind in DESCRIPTORS:
        lines += [image(f"curves_{kind}", f"training curves of the {kind} model"), ""]
    lines += ["## Confusion matrices (test clips)", ""]
    lines += [image(f"confusion_{model}", f"{model} test confusion") for model in demo.models]
    lines += [image(f"confusion_fusion_{weighting}", f"fusion ({weighting}) test confusion")
              for weighting in WEIGHTINGS]
    lines += [""]
    lines += ["## Commands", "", "The demo ran these commands in one process; each can be run by hand.", "", "```"]
    lines += [line for _, line in demo.commands]
    lines += ["```", "", "## Time (seconds, stages run so far)", "", "| stage | s |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
    report = demo.out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report, rows

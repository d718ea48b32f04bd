"""Classification metrics and their pictures, shared by `test`, `score-features`, `fuse` and the demo report."""

import json
import re

import numpy as np

from emotiw import EMOTIONS, NO_LABEL
from emotiw.formats.files import atomic_path


def classification_metrics(labels, predictions, num_classes=len(EMOTIONS)):
    """Accuracy, per-class accuracy (recall), macro F1 over the classes present, confusion matrix."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    true_positives = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    present = (support + predicted) > 0
    f1 = 2 * true_positives[present] / (support[present] + predicted[present])
    return {
        "accuracy": float(true_positives.sum() / len(labels)),
        "per_class_accuracy": {EMOTIONS[c]: (float(true_positives[c] / support[c]) if support[c] else None)
                               for c in range(num_classes)},
        "macro_f1": float(f1.mean()),
        "confusion_matrix": confusion.tolist(),
    }


def clip_metrics(labels, clip_scores, faces):
    """metrics.json's scores, over the labelled clips; None when the list has no label. `faces`: the
    face frames of each clip (0 for a clip scored with the fallback)."""
    labelled = labels != NO_LABEL
    if not labelled.any():
        return None
    predictions = clip_scores.argmax(axis=1)
    metrics = classification_metrics(labels[labelled], predictions[labelled])
    with_face = labelled & (faces > 0)
    metrics["accuracy_with_faces"] = (float((predictions[with_face] == labels[with_face]).mean())
                                      if with_face.any() else None)
    metrics["labelled_clips"] = int(labelled.sum())
    metrics["labelled_clips_with_faces"] = int(with_face.sum())
    return metrics


def metrics_line(metrics):
    """One line of a test's figures, for the terminal."""
    parts = [f"{metrics['clips']} clips ({metrics['fallback_clips']} without a face)"]
    if metrics["accuracy"] is not None:
        parts.append(f"accuracy {metrics['accuracy']:.4f}")
        if metrics["accuracy_with_faces"] is not None:
            parts.append(f"on clips with faces {metrics['accuracy_with_faces']:.4f}")
        parts.append(f"macro F1 {metrics['macro_f1']:.4f}")
    else:
        parts.append("no labels: accuracy not computed")
    return ", ".join(parts)


def plot_confusion(confusion, path, title):
    from matplotlib.figure import Figure

    confusion = np.asarray(confusion)
    figure = Figure(figsize=(6.5, 5.5))
    axes = figure.add_subplot()
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes)
    ticks = range(len(EMOTIONS))
    axes.set_xticks(ticks, EMOTIONS, rotation=45, ha="right")
    axes.set_yticks(ticks, EMOTIONS)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    threshold = confusion.max() / 2 if confusion.size else 0
    for (row, column), count in np.ndenumerate(confusion):
        axes.text(column, row, str(count), ha="center", va="center",
                  color="white" if count > threshold else "black")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def compact_json(value):
    """Indented JSON with every list of numbers on one line (confusion rows stay readable)."""
    text = json.dumps(value, indent=2)
    return re.sub(r"\[\s+([-+.\deE,\s]+?)\s+\]", lambda match: "[" + " ".join(match.group(1).split()) + "]",
                  text) + "\n"

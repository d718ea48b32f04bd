"""The `fuse` stage: late fusion of per-clip score files by a weighted arithmetic mean.

fused = sum_i w_i * s_i / sum_i w_i, the rule behind SSE's EmotiW 2017 submission (weights 1 1 1 4 7).
The weights are given, or searched on validation scores: an exhaustive grid on the simplex for up to
five models, coordinate ascent on the same grid beyond. The objective is validation accuracy; ties
go to the higher mean log-likelihood, then to the weights closest to uniform.

A model may lack some clips (an audio model has no score for a clip without sound): score files
with clip names are matched by name against the reference (the video list, else the file with the
most clips), and for a clip a model lacks the sums run over the models that have it, so the
remaining weights are renormalised; a missing score is never taken as zeros. A clip whose models
with a score all have weight 0 gets their plain mean.
"""

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS
from emotiw.errors import UserError
from emotiw.formats.files import atomic_write_text
from emotiw.formats.lists import read_list
from emotiw.formats.scores import clip_stem, read_scores, write_predictions_csv, write_scores_txt, write_submission
from emotiw.output import output_folder

NORMALIZATIONS = ("none", "l1", "softmax")
MAX_GRID_MODELS = 5
LOG_FLOOR = 1e-12  # fused scores are clipped here before the log: scores can be 0 or negative
CHUNK_VALUES = 1 << 22  # fused values held at once during a search (32 MiB of float64)
LL_DECIMALS = 9  # log-likelihoods equal to this many decimals tie (summation order differs per batch)
MAX_WEIGHT_VECTORS = 1_000_000  # per search (per round beyond MAX_GRID_MODELS): bounds time and memory


@dataclass
class SearchResult:
    weights: np.ndarray  # sums to 1
    correct: int
    log_likelihood: float
    method: str
    evaluated: int  # weight vectors scored


def normalize_scores(scores, method):
    """Per-row normalisation applied to every model's scores before fusing."""
    if method == "none":
        return scores
    if method == "l1":
        # each row is divided by its largest absolute value first, so that the sum cannot overflow
        largest = np.abs(scores).max(axis=-1, keepdims=True)
        scaled = scores / np.where(largest > 0, largest, 1.0)
        totals = np.abs(scaled).sum(axis=-1, keepdims=True)
        return scaled / np.where(totals > 0, totals, 1.0)
    if method == "softmax":
        with np.errstate(over="ignore"):  # a difference below -1.8e308 becomes -inf, whose exp is 0
            exponentials = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return exponentials / exponentials.sum(axis=-1, keepdims=True)
    raise ValueError(f"unknown normalisation {method!r}")


def unit_weights(weights):
    """Weights (..., M) scaled to sum 1; divided by the largest first, so that the sum of huge
    weights (1e308 1e308) cannot overflow to inf and turn every weight into 0."""
    weights = np.asarray(weights, dtype=np.float64)
    scaled = weights / weights.max(axis=-1, keepdims=True)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def fuse_many(stack, weights):
    """Fused scores (K, N, C) of a model stack (M, N, C) under K weight vectors (K, M); NaN rows
    of the stack (a model without that clip) leave the clip to the other models."""
    models, clips, classes = stack.shape
    weights = unit_weights(weights)
    present = ~np.isnan(stack[:, :, 0])
    if present.all():
        return (weights @ stack.reshape(models, clips * classes)).reshape(len(weights), clips, classes)
    filled = np.where(present[:, :, None], stack, 0.0).reshape(models, clips * classes)
    fused = (weights @ filled).reshape(len(weights), clips, classes)
    totals = weights @ present  # (K, N): the weight of the models that have each clip
    plain_mean = filled.reshape(models, clips, classes).sum(axis=0) / present.sum(axis=0)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        renormalised = fused / totals[:, :, None]
    return np.where(totals[:, :, None] > 0, renormalised, plain_mean[None])


def fuse_stack(stack, weights):
    """sum_i w_i * s_i / sum_i w_i for a model stack (M, N, C)."""
    return fuse_many(stack, np.asarray(weights, dtype=np.float64)[None])[0]


def count_correct(scores, labels):
    """Clips whose argmax is the label, for scores (..., N, C)."""
    return (scores.argmax(axis=-1) == labels).sum(axis=-1)


def mean_log_likelihood(scores, labels):
    """Mean log of the label's share once scores (..., N, C) are clipped positive and rows sum to 1."""
    positive = np.clip(scores, LOG_FLOOR, None)
    index = np.broadcast_to(labels[:, None], positive.shape[:-1] + (1,))
    at_label = np.take_along_axis(positive, index, axis=-1)[..., 0]
    with np.errstate(over="ignore"):  # rows of values near 1e308 sum to inf: log-likelihood -inf, the worst
        return np.mean(np.log(at_label) - np.log(positive.sum(axis=-1)), axis=-1)


def simplex_grid(num_models, units):
    """Every split of `units` steps over `num_models` weights (stars and bars), shape (K, M)."""
    bars = np.array(list(itertools.combinations(range(units + num_models - 1), num_models - 1)),
                    dtype=np.int64).reshape(-1, num_models - 1)
    edges = np.hstack([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), units + num_models - 1)])
    return np.diff(edges, axis=1) - 1


def _evaluate(stack, labels, weights):
    """(correct, log-likelihood) per weight vector, in batches small enough to keep memory bounded."""
    batch = max(1, CHUNK_VALUES // (stack.shape[1] * stack.shape[2]))
    correct = np.empty(len(weights), dtype=np.int64)
    log_likelihood = np.empty(len(weights))
    for start in range(0, len(weights), batch):
        fused = fuse_many(stack, weights[start:start + batch])
        correct[start:start + batch] = count_correct(fused, labels)
        log_likelihood[start:start + batch] = mean_log_likelihood(fused, labels)
    return correct, log_likelihood


def _best(weights, correct, log_likelihood):
    """Index of the best weight vector: most correct, then highest log-likelihood, then most uniform.

    Rounding makes the order total, so coordinate ascent cannot cycle; among exact ties the
    first vector wins.
    """
    from_uniform = np.linalg.norm(unit_weights(weights) - 1.0 / weights.shape[1], axis=1)
    order = np.lexsort((np.round(from_uniform, 12), -np.round(log_likelihood, LL_DECIMALS), -correct))
    return order[0]


def weight_vectors(num_models, units):
    """How many weight vectors a search scores at once: the whole grid up to MAX_GRID_MODELS models,
    else one round of coordinate ascent (staying, or k steps from one model to another)."""
    if num_models <= MAX_GRID_MODELS:
        return math.comb(units + num_models - 1, num_models - 1)
    return 1 + (num_models - 1) * units


def _largest_step_count(num_models):
    """The most steps in 1 whose search fits the bound, among {1, 2, 4, 5} x 10^k (so that the step
    reads 0.1, 0.05, 0.025, 0.02, 0.01, ...)."""
    counts = [digit * 10 ** power for power in range(308) for digit in (1, 2, 4, 5)]
    return max(units for units in counts if weight_vectors(num_models, units) <= MAX_WEIGHT_VECTORS)


def _grid_units(step, num_models):
    """The number of steps in 1; refuses a step that is not a whole fraction of 1, or whose search
    would score more than MAX_WEIGHT_VECTORS weight vectors (it would run out of memory)."""
    if not 0 < step <= 1:
        raise UserError(f"--step {step}: must be in (0, 1]")
    steps = 1 / step
    units = round(steps) if math.isfinite(steps) else None  # a subnormal step: 1 / step overflows
    if units is not None and abs(units * step - 1) > 1e-9:
        raise UserError(f"--step {step}: 1 must be a whole number of steps (e.g. 0.05, 0.1, 0.125)")
    count = None if units is None else weight_vectors(num_models, units)
    if count is not None and count <= MAX_WEIGHT_VECTORS:
        return units
    fits = 1 / _largest_step_count(num_models)
    raise UserError(f"--step {step}: {'too many' if count is None else f'{count:,}'} weight vectors to score "
                    f"for {num_models} models, over the limit of {MAX_WEIGHT_VECTORS:,}; "
                    f"use --step {fits} or larger")


def search_weights(stack, labels, step=0.05):
    """Weights on the simplex (multiples of `step`) that fuse the validation stack (M, N, C) best."""
    units = _grid_units(step, stack.shape[0])
    labels = np.asarray(labels, dtype=np.int64)
    if stack.shape[0] <= MAX_GRID_MODELS:
        candidates = simplex_grid(stack.shape[0], units)
        correct, log_likelihood = _evaluate(stack, labels, candidates)
        best = _best(candidates, correct, log_likelihood)
        return SearchResult(candidates[best] / units, int(correct[best]), float(log_likelihood[best]),
                            "grid", len(candidates))
    return _coordinate_ascent(stack, labels, units)


def _coordinate_ascent(stack, labels, units):
    """From near-uniform weights, repeatedly move k steps of weight from one model to another."""
    num_models = stack.shape[0]
    current = np.full(num_models, units // num_models)
    current[:units % num_models] += 1
    evaluated = 0
    while True:
        candidates = np.vstack([current[None], _moves(current)])
        correct, log_likelihood = _evaluate(stack, labels, candidates)
        evaluated += len(candidates)
        best = _best(candidates, correct, log_likelihood)  # index 0 (stay) wins ties
        if best == 0:
            return SearchResult(current / units, int(correct[0]), float(log_likelihood[0]),
                                "coordinate-ascent", evaluated)
        current = candidates[best]


def _moves(current):
    """Every grid point reached by moving k >= 1 steps from model `source` to model `target`."""
    moves = []
    for source, target in itertools.permutations(range(len(current)), 2):
        for k in range(1, current[source] + 1):
            moved = current.copy()
            moved[source] -= k
            moved[target] += k
            moves.append(moved)
    return np.array(moves, dtype=np.int64).reshape(-1, len(current))


# ---------------------------------------------------------------------------------------------
# Score files

def split_score_spec(spec):
    """`FILE.mat:VARIABLE` names a .mat variable: (path, variable); anything else is a path."""
    path, separator, variable = spec.rpartition(":")
    if separator and path.lower().endswith(".mat"):
        return path, variable
    return spec, None


def read_score_spec(spec):
    path, variable = split_score_spec(spec)
    return read_scores(path, variable=variable)


def aligned_clips(tables, video_list=None):
    """Checks that all tables hold the same clips in the same order, or (named) a subset of them;
    returns (clips, labels, rows): rows[m][n] is the row of table m holding clip n, or -1.

    The reference is the video list when given, else the named table with the most clips, else the
    first table. Clip names come from the list, else from that table, else they are numbered.
    """
    if video_list is not None:
        clips, labels = read_list(video_list)
        reference = f"the video list {video_list}"
    else:
        named = [table for table in tables if table.clips is not None]
        longest = max(named, key=len) if named else tables[0]
        clips = longest.clips
        labels = None
        reference = f"{longest.path}"
    count = len(clips) if clips is not None else len(tables[0])
    rows = [_rows_by_name(table, clips, reference) if clips is not None and table.clips is not None
            and len(table) < count else None for table in tables]
    for table, matched in zip(tables, rows):
        if matched is not None:
            continue
        if len(table) != count:
            row = min(len(table), count) + 1
            raise UserError(f"{table.path}: {len(table)} rows but {reference} has {count}: "
                            f"row {row} is {'missing' if len(table) < count else 'extra'}")
        _check_clip_names(table, clips, reference)
    if labels is None:
        labels = next((table.labels for table, matched in zip(tables, rows)
                       if table.labels is not None and matched is None), None)
    if clips is None:
        width = max(4, len(str(count)))
        clips = [f"{index:0{width}d}" for index in range(1, count + 1)]
    rows = [np.arange(count) if matched is None else matched for matched in rows]
    covered = np.any([matched >= 0 for matched in rows], axis=0)
    if not covered.all():
        raise UserError(f"clip {clips[int(np.argmin(covered))]} has a score in none of the files")
    return clips, labels, rows


def _rows_by_name(table, clips, reference):
    """Where each reference clip is in a table that lacks some: its row, or -1."""
    where = {clip_stem(clip): row for row, clip in enumerate(table.clips)}
    known = {clip_stem(clip) for clip in clips}
    stranger = next((clip for clip in table.clips if clip_stem(clip) not in known), None)
    if stranger is not None:
        raise UserError(f"{table.path}: clip {stranger} is not in {reference}")
    return np.array([where.get(clip_stem(clip), -1) for clip in clips], dtype=np.int64)


def _check_clip_names(table, clips, reference):
    if table.clips is None or clips is None:
        return
    for row, (mine, theirs) in enumerate(zip(table.clips, clips), start=1):
        if clip_stem(mine) != clip_stem(theirs):
            raise UserError(f"{table.path}: row {row} is clip {mine} but {reference} has {theirs} there; "
                            "score files must list the same clips in the same order")


def _stack(tables, normalize, rows):
    """(M, N, C) normalised scores in the reference's clip order, NaN where a model lacks a clip."""
    stack = []
    for table, matched in zip(tables, rows):
        scores = normalize_scores(table.scores.astype(np.float64), normalize)[np.maximum(matched, 0)]
        scores[matched < 0] = np.nan
        stack.append(scores)
    return np.stack(stack)


def _check_arguments(scores, weights, search, val_scores, names, step):
    count = len(scores)
    if weights is not None and len(weights) != count:
        raise UserError(f"--model-weights has {len(weights)} values for {count} score files")
    if weights is not None and search:
        raise UserError("give either --model-weights or --search, not both")
    if weights is not None and not all(math.isfinite(weight) for weight in weights):
        raise UserError(f"--model-weights {' '.join(map(str, weights))}: every weight must be a finite number")
    if weights is not None and (min(weights) < 0 or max(weights) <= 0):
        raise UserError("--model-weights must be non-negative with a positive sum")
    if names is not None and len(names) != count:
        raise UserError(f"--names has {len(names)} names for {count} score files")
    if val_scores is not None and len(val_scores) != count:
        raise UserError(f"--val-scores has {len(val_scores)} files for {count} test score files")
    if search and val_scores is None:
        raise UserError("--search needs --val-scores (and labels: --val-labels or predictions.csv files)")
    if search:
        _grid_units(step, count)  # a step that is refused later is refused before any file is read


def _validation(val_scores, val_labels, normalize):
    """(stack, labels) of the validation scores, or None when none are given."""
    if val_scores is None:
        return None
    tables = [read_score_spec(spec) for spec in val_scores]
    _, labels, rows = aligned_clips(tables, val_labels)
    if labels is None:
        raise UserError("validation labels are missing: give --val-labels LIST with `<clip> <label>` lines")
    unknown = np.flatnonzero(labels < 0)
    if len(unknown):
        raise UserError(f"validation clip {unknown[0] + 1} has no label ({val_labels or val_scores[0]})")
    return _stack(tables, normalize, rows), labels


def _accuracies(stack, labels, weights):
    """Accuracy of every single model and of the fusion, or None without labels."""
    if labels is None or np.any(labels < 0):
        return None
    present = ~np.isnan(stack[:, :, 0])  # a model's accuracy is over the clips it has
    singles = [float(count_correct(scores[has], labels[has])) / max(1, int(has.sum()))
               for scores, has in zip(stack, present)]
    fused = fuse_stack(stack, weights)
    return {"models": singles, "fusion": float(count_correct(fused, labels)) / len(labels),
            "fusion_log_likelihood": float(mean_log_likelihood(fused, labels)), "clips": len(labels)}


def _report_table(names, weights, val, test):
    def cell(report, index=None):
        if report is None:
            return "-"
        return f"{100 * (report['fusion'] if index is None else report['models'][index]):.2f}"

    width = max(len("fusion"), *(len(name) for name in names))
    lines = [f"{'model':<{width}}  {'weight':>8}  {'val acc %':>9}  {'test acc %':>10}"]
    for index, (name, weight) in enumerate(zip(names, weights)):
        lines.append(f"{name:<{width}}  {weight:>8.4f}  {cell(val, index):>9}  {cell(test, index):>10}")
    lines.append(f"{'fusion':<{width}}  {'':>8}  {cell(val):>9}  {cell(test):>10}")
    return "\n".join(lines)


@dataclass
class FuseResult:
    """What `fuse` wrote: fusion.json's content and the fused scores."""
    out: Path
    weights: np.ndarray            # unit weights, one per model
    scores: np.ndarray             # fused (clips, classes)
    clips: list
    summary: dict                  # fusion.json
    table: str                     # the report table printed by the CLI

    @property
    def validation(self):
        return self.summary["validation"]

    @property
    def test(self):
        return self.summary["test"]


def fuse(scores, out, model_weights=None, search=False, val_scores=None, val_labels=None, step=0.05,
         normalize="none", names=None, videos=None) -> FuseResult:
    """Late fusion of per-clip score files: fused = sum_i w_i * s_i / sum_i w_i.

    scores: test score files (EmotiW .txt, predictions.csv, FILE.mat[:VARIABLE]); out: the output
    folder (scores.txt, predictions.csv, submission/, fusion.json); model_weights: one finite,
    non-negative weight per file, normalised to sum 1 (default equal); search: search the weights on
    val_scores (one per test file, same order) with labels from
    val_labels (a video list) or the predictions.csv files; step: the weight grid step; normalize:
    none, l1 or softmax per row before fusing; names: model names for the report; videos: the test
    video list, which checks row counts and names the clips.
    """
    scores = [str(spec) for spec in scores]
    val_scores = None if val_scores is None else [str(spec) for spec in val_scores]
    weights = model_weights
    _check_arguments(scores, weights, search, val_scores, names, step)
    tables = [read_score_spec(spec) for spec in scores]
    clips, labels, rows = aligned_clips(tables, videos)
    names = names or [Path(split_score_spec(spec)[0]).stem for spec in scores]
    validation = _validation(val_scores, val_labels, normalize)
    found = None
    if search:
        found = search_weights(*validation, step=step)
        weights = found.weights
    else:
        weights = np.asarray(weights or [1.0] * len(tables), dtype=np.float64)
    units = unit_weights(weights)
    stack = _stack(tables, normalize, rows)
    fused = fuse_stack(stack, weights)
    if not np.isfinite(fused).all():
        raise UserError("the fused scores overflow (score values near 1e308); scale the score files down "
                        "or fuse with --normalize l1 or softmax")
    val = _accuracies(*validation, weights) if validation is not None else None
    test = _accuracies(stack, labels, weights)

    out = Path(out)
    with output_folder(out, "fuse", inputs=[split_score_spec(spec)[0] for spec in scores]):
        write_submission(out / "submission", clips, fused.argmax(axis=1))  # first: it refuses unusable clip names
        write_scores_txt(out / "scores.txt", fused)
        write_predictions_csv(out / "predictions.csv", clips, labels, fused)
        summary = {
            "models": [{"name": name, "scores": spec, "weight": float(weight), "unit_weight": float(unit),
                        "missing_clips": int((matched < 0).sum())}
                       for name, spec, weight, unit, matched in zip(names, scores, weights, units, rows)],
            "rule": "fused = sum_i w_i * s_i / sum_i w_i",
            "normalize": normalize,
            "search": None if found is None else {"method": found.method, "step": step,
                                                  "weight_vectors": found.evaluated},
            "validation": val,
            "test": test,
            "clips": len(clips),
            "class_order": list(EMOTIONS),
        }
        atomic_write_text(out / "fusion.json", json.dumps(summary, indent=2) + "\n")
    return FuseResult(out=out, weights=units, scores=fused, clips=clips, summary=summary,
                      table=_report_table(names, units, val, test))

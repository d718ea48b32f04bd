"""Fuzz: generated score files of every format emotiw.formats.scores reads (EmotiW txt,
predictions.csv, MATLAB v5 and v7.3 .mat), fed to read_scores and to `fuse` in-process. Each file
starts valid and about every other one gets one damage (a bad token, a short row, odd clip names
or labels, another encoding, a cut, mismatched variables). Each must give results or a UserError
(the CLI's one line), never another exception; what it gives must be finite scores, one row per
clip, and a scores.txt that reads back."""

import csv
import io
import tempfile
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emotiw import EMOTIONS
from emotiw.errors import UserError
from emotiw.formats.scores import PREDICTION_COLUMNS, read_scores
from emotiw.stages.fuse import fuse

EXAMPLES = 200
V73_HEADER = b"MATLAB 7.3 MAT-file".ljust(116) + bytes(8) + b"\x00\x02IM"
EXTREMES = [0.0, -0.0, 5e-324, 1e-310, -3.5, 1e300, 1.7976931348623157e308, -1.7976931348623157e308]

scores = st.one_of(st.floats(0, 1), st.floats(0, 1), st.sampled_from(EXTREMES))
junk_tokens = st.one_of(st.sampled_from(["", "nan", "-inf", "inf", "1e999", "0x1p3", "1_0", "٣", "1,5", "--1",
                                         "NaN", "\x00", '"', "1e-400"]), st.text(max_size=4))
plain_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_/.]{0,11}", fullmatch=True)
odd_names = st.one_of(st.text(max_size=8), st.sampled_from(["", "/", ".", "..", "a/..", "x" * 300, "a\x00b",
                                                             "c,d", 'e"f', "g\nh", "dup", "dup.avi"]))
good_labels = st.sampled_from(["-1", "", *map(str, range(7)), *EMOTIONS, "anger"])
bad_labels = st.one_of(st.sampled_from(["7", "-2", "3.5", "x", "99999999999", " 1"]), st.text(max_size=3))
damaged = st.booleans()
cut = st.sampled_from([False, False, False, False, True])  # a download cut short, now and then


def score_token(draw):
    return draw(st.sampled_from(["{!r}", "{:.6g}", "{:.17g}", "{:e}"])).format(draw(scores))


def encode(draw, text):
    """UTF-8, or (damage) another encoding or bytes that are not UTF-8."""
    how = draw(st.sampled_from(["utf-16", "latin-1", "junk", "utf-8-sig"]))
    if how == "junk":
        return text.encode() + draw(st.binary(min_size=1, max_size=8))
    return text.encode(how, errors="replace")


@st.composite
def txt_files(draw):
    rows = [[score_token(draw) for _ in EMOTIONS] for _ in range(draw(st.integers(1, 5)))]
    separator, ending = draw(st.sampled_from([" ", " ", "\t", "  "])), draw(st.sampled_from(["", " "]))
    damage = draw(st.sampled_from(["token", "short", "long", "blank", "encoding", "empty"])) if draw(damaged) else None
    row = draw(st.integers(0, len(rows) - 1))
    if damage == "token":
        rows[row][draw(st.integers(0, 6))] = draw(junk_tokens)
    elif damage == "short":
        rows[row].pop()
    elif damage == "long":
        rows[row].append(score_token(draw))
    elif damage == "blank":
        rows.insert(row, [])
    elif damage == "empty":
        rows = []
    text = "\n".join(separator.join(cells) + ending for cells in rows) + draw(st.sampled_from(["", "\n", "\n\n"]))
    return "model.txt", None, encode(draw, text) if damage == "encoding" else text.encode()


@st.composite
def csv_files(draw):
    columns = list(PREDICTION_COLUMNS)
    if draw(st.booleans()):
        columns = draw(st.permutations(columns))
    records = []
    for _ in range(draw(st.integers(1, 5))):
        record = {"clip": draw(plain_names), "label": draw(good_labels), "prediction": "0",
                  "n_frames": "3", "fallback": draw(st.sampled_from(["", "0", "1"]))}
        record.update({name: score_token(draw) for name in EMOTIONS})
        records.append(record)
    damage = draw(st.sampled_from(["name", "label", "token", "short", "columns", "commas", "encoding", "header"])) \
        if draw(damaged) else None
    record = draw(st.sampled_from(records))
    if damage == "name":
        record["clip"] = draw(odd_names)
    elif damage == "label":
        record["label"] = draw(bad_labels)
    elif damage == "token":
        record[draw(st.sampled_from(EMOTIONS))] = draw(junk_tokens)
    elif damage == "columns":
        columns = draw(st.lists(st.sampled_from(PREDICTION_COLUMNS), max_size=len(PREDICTION_COLUMNS)))
    elif damage == "header":
        columns = [*columns, "clip"]
    lines = [[record.get(name, "") for name in columns] for record in records]
    if damage == "short":
        lines[0] = lines[0][:draw(st.integers(0, len(columns) - 1))]
    if damage == "commas":  # written by hand: commas and quotes inside fields shift the columns
        text = "\n".join(",".join(line) for line in [columns, *lines]) + "\n"
    else:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([columns, *lines])
        text = buffer.getvalue()
    return "predictions.csv", None, encode(draw, text) if damage == "encoding" else text.encode()


def score_matrix(draw, rows, columns=len(EMOTIONS)):
    return np.array([[draw(scores) for _ in range(columns)] for _ in range(rows)], dtype=np.float64).reshape(
        rows, columns)


def mat_variables(draw):
    """`feats`, or leveldb2mat --videos' video_feats with names and labels; (variables, variable to read)."""
    rows = draw(st.integers(1, 5))
    if draw(st.booleans()):
        variables, variable = {"feats": score_matrix(draw, rows)}, None
    else:
        variables = {"feats": score_matrix(draw, rows + 2), "video_feats": score_matrix(draw, rows),
                     "video_names": draw(st.lists(plain_names, min_size=rows, max_size=rows)),
                     "video_labels": np.array(draw(st.lists(st.integers(-1, 6), min_size=rows, max_size=rows)),
                                              dtype=np.float64).reshape(-1, 1)}
        variable = draw(st.sampled_from(["video_feats", "feats"]))
    damage = draw(st.sampled_from(["nan", "columns", "dtype", "labels", "names", "missing", "extra"])) \
        if draw(damaged) else None
    name = variable or "feats"
    if damage == "nan":
        variables[name][draw(st.integers(0, len(variables[name]) - 1)), 0] = draw(st.sampled_from(
            [np.nan, np.inf, -np.inf]))
    elif damage == "columns":
        variables[name] = score_matrix(draw, rows, draw(st.sampled_from([1, 6, 8])))
    elif damage == "dtype":
        kind = draw(st.sampled_from([np.float32, np.int32, np.uint8, np.complex128, np.bool_]))
        with np.errstate(over="ignore", invalid="ignore"):
            variables[name] = variables[name].clip(-100, 255).astype(kind)
    elif damage == "labels" and "video_labels" in variables:
        variables["video_labels"][0] = draw(st.sampled_from([7, -2, 2.5, np.nan]))
    elif damage == "names" and "video_names" in variables:
        variables["video_names"] = variables["video_names"][:-1] or np.zeros(3)
    elif damage == "missing":
        variable = "absent"
    elif damage == "extra":  # a second 7-column matrix: the default variable is ambiguous
        variables["other"] = score_matrix(draw, 2)
    return variables, variable


def truncate(draw, data, keep=0):
    return data[:draw(st.integers(keep, len(data) - 1))] if draw(cut) else data


@st.composite
def mat_v5_files(draw):
    variables, variable = mat_variables(draw)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables)
    return "scores.mat", variable, truncate(draw, buffer.getvalue())


@st.composite
def mat_v73_files(draw):
    variables, variable = mat_variables(draw)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", userblock_size=512) as handle:
        for name, value in variables.items():
            if isinstance(value, list):  # a MATLAB char matrix, one UTF-16 code unit per element
                width = max(map(len, value))
                codes = np.array([[ord(char) for char in text.ljust(width)] for text in value], dtype=np.uint16)
                if draw(cut):  # any code unit, lone surrogates included
                    codes[0, 0] = draw(st.integers(0, 0xFFFF))
                dataset = handle.create_dataset(name, data=codes.T)
                dataset.attrs["MATLAB_class"] = np.bytes_("char")
            else:
                handle.create_dataset(name, data=np.atleast_2d(value).T)
    data = bytearray(buffer.getvalue())
    data[:len(V73_HEADER)] = V73_HEADER
    return "scores.mat", variable, truncate(draw, bytes(data), keep=len(V73_HEADER))


@st.composite
def raw_files(draw):
    name = draw(st.sampled_from(["model.txt", "predictions.csv", "scores.mat"]))
    prefix = V73_HEADER if name == "scores.mat" and draw(st.booleans()) else b""
    return name, None, prefix + draw(st.binary(max_size=300))


score_files = st.one_of(txt_files(), csv_files(), mat_v5_files(), mat_v73_files(), raw_files())


def check_table(table):
    assert table.scores.ndim == 2 and table.scores.shape[1] == len(EMOTIONS) and len(table) > 0
    assert np.isfinite(table.scores).all()
    for extra in (table.clips, table.labels):
        assert extra is None or len(extra) == len(table)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(score_files, st.sampled_from(["none", "l1", "softmax"]))
def test_every_score_file_gives_scores_or_a_user_error(score_file, normalize):
    name, variable, data = score_file
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / name
        path.write_bytes(data)
        spec = f"{path}:{variable}" if variable else str(path)
        try:
            check_table(read_scores(path, variable=variable))
        except UserError:
            pass
        for options in ({"model_weights": [1.0, 3.0], "normalize": normalize},
                        {"search": True, "val_scores": [spec, spec], "step": 0.25, "normalize": normalize}):
            out = Path(work) / "out"
            try:
                result = fuse([spec, spec], out, **options)
            except UserError:
                continue
            assert np.isfinite(result.scores).all() and len(result.scores) == len(result.clips)
            np.testing.assert_allclose(read_scores(out / "scores.txt").scores, result.scores, rtol=1e-5,
                                       atol=1e-300)
            assert len(list((out / "submission").iterdir())) == len(result.clips)

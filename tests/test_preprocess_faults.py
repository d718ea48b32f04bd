"""`emotiw preprocess` when things go wrong: names that would lead out of OUT, signals and killed
runs with workers, two runs into one OUT, a full disk, a read-only OUT, messages for bad inputs.
Real runs throughout: real PyAV decoding and the real Caffe MTCNN, in subprocesses where a signal,
a second process or a resource limit is the point.
"""

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import media
import pytest
from helpers import read_csv, remount, snapshot, tmpfs

from emotiw.cli import main
from emotiw.formats.lists import read_label_file
from emotiw.inputs import discover

REPO = Path(__file__).resolve().parents[1]
CLIPS, FRAMES = 6, 16
OPTIONS = ["--mode", "sse"]


def command(videos, out, *options):
    return [sys.executable, "-m", "emotiw.cli", "preprocess", "--videos", str(videos), "--out", str(out),
            *OPTIONS, *options]


def run_here(videos, out, *options):
    return main(command(videos, out, *options)[3:])


def start(videos, out, *options, **popen):
    return subprocess.Popen(command(videos, out, *options), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **popen)


def wait_for(condition, process=None, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, "the run ended too early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def stderr_lines(text):
    return [line for line in text.splitlines() if line.strip()]


def process_table():
    """{pid: (parent pid, state)} from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid):
    table, found, todo = process_table(), set(), [pid]
    while todo:
        parent = todo.pop()
        children = [child for child, (ppid, _) in table.items() if ppid == parent]
        found.update(children)
        todo += children
    return found


def alive(pids):
    """The pids that still run (a zombie has ended; an orphan's zombie may wait for a reaper)."""
    table = process_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


def workers_of(pid):
    """The multiprocessing workers among the descendants of `pid`."""
    workers = set()
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.add(child)
    return workers


@contextlib.contextmanager
def reaping(pids):
    """Kills what is left of `pids` at the end, so that a failing test leaves no process behind."""
    try:
        yield
    finally:
        for pid in alive(pids):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def two_workers_at_work(clips, out, **popen):
    """A `--workers 2` run once its first crop is written: yields (process, its children); then
    kills the run and checks that every child died with it."""
    process = start(clips, out, "--workers", "2", **popen)
    children = set()
    with reaping(children):
        try:
            wait_for(lambda: list((out / "faces").glob("*/*/*.png")), process)
            children |= descendants(process.pid)
            assert len(workers_of(process.pid)) == 2
            yield process, children
        finally:
            process.kill()
            process.wait()
        wait_for(lambda: not alive(children), timeout=10)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """CLIPS copies of one moving-face clip in a flat folder `clips` (so the split is `clips`)."""
    root = tmp_path_factory.mktemp("faults") / "clips"
    root.mkdir()
    media.moving_face_clip(root / "c0.mp4", FRAMES)
    for n in range(1, CLIPS):
        shutil.copyfile(root / "c0.mp4", root / f"c{n}.mp4")
    return root


@pytest.fixture(scope="module")
def reference(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults-reference") / "out"
    assert run_here(clips, out) == 0
    return out


def finished(out):
    return list((out / "clips").glob("*/*.csv"))


# ------------------------------------------------------------------------- names and OUT


def test_the_split_of_dot_and_dotdot_is_the_folders_real_name(tmp_path, monkeypatch):
    """`--videos .` gave the split "" and `--videos ..` the split "..": a clip named train.mp4
    then removed OUT/faces/train, one named faces.mp4 removed OUT/faces."""
    out = tmp_path / "out"
    train = tmp_path / "train"
    train.mkdir()
    media.moving_face_clip(train / "001.mp4", 3)
    assert run_here(train, out) == 0
    kept = snapshot(out / "faces")
    clips, other = tmp_path / "clips", tmp_path / "other"
    clips.mkdir()
    (other / "inner").mkdir(parents=True)
    shutil.copyfile(train / "001.mp4", clips / "train.mp4")
    shutil.copyfile(train / "001.mp4", other / "faces.mp4")
    monkeypatch.chdir(clips)
    assert run_here(".", out) == 0
    monkeypatch.chdir(other / "inner")
    assert run_here("..", out) == 0
    assert {key: value for key, value in snapshot(out / "faces").items() if key.startswith("train/")} == kept
    rows = read_csv(out / "manifest.csv")
    assert {(r["split"], r["clip"]) for r in rows} == {("train", "001"), ("clips", "train"), ("other", "faces")}
    assert all((out / r["crop"]).is_file() for r in rows if r["crop"])


@pytest.mark.parametrize("split", ["../../escape", "a/b", ".", "", "x y", "..\\x"])
def test_a_split_that_is_no_plain_name_is_refused(clips, tmp_path, capsys, split):
    out = tmp_path / "deep" / "er" / "out"
    assert run_here(clips, out, "--split", split) == 2
    (line,) = stderr_lines(capsys.readouterr().err)
    assert "cannot name a split" in line
    assert not (tmp_path / "deep").exists()  # nothing written anywhere, OUT not even created


def test_an_input_folder_whose_name_is_no_split_needs_split(tmp_path, capsys):
    folder = tmp_path / "my clips"
    folder.mkdir()
    media.no_face_clip(folder / "a.mp4", 2)
    assert run_here(folder, tmp_path / "out") == 2
    (line,) = stderr_lines(capsys.readouterr().err)
    assert "give --split NAME" in line and "'my clips'" in line


def test_a_symbolic_link_in_out_never_takes_a_write_outside(clips, tmp_path, capsys):
    """process_item removed the clip's old crop folder through a link that led out of OUT."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "c0").mkdir(parents=True)
    (elsewhere / "c0" / "precious.txt").write_text("keep me")
    out = tmp_path / "out"
    (out / "faces").mkdir(parents=True)
    (out / "faces" / "clips").symlink_to(elsewhere)
    assert run_here(clips, out) == 2
    (line,) = stderr_lines(capsys.readouterr().err)
    assert "leads outside" in line
    assert [p.relative_to(elsewhere).as_posix() for p in elsewhere.rglob("*")] == ["c0", "c0/precious.txt"]


def test_clip_names_are_plain_file_names_and_never_collide(tmp_path):
    root = tmp_path / "val"
    root.mkdir()
    for name in ("a b.mp4", "a_b.mp4", "ok.mp4", "x" * 240 + ".mp4", "_aligned.jpg", "caf\u00e9,1.mp4"):
        (root / name).write_bytes(b"")
    items, problems = discover(root)
    assert sorted(i.clip for i in items) == ["a_b", "caf__1", "ok"]
    messages = sorted((p.clip, p.message) for p in problems)
    assert [clip for clip, _ in messages] == ["", "a_b", "x" * 200]
    assert "duplicate clip name 'a_b'" in messages[1][1] and "a b.mp4" in messages[1][1]
    assert all("no clip name" in message for clip, message in messages if clip != "a_b")


# ------------------------------------------------------------------------- messages


def test_a_missing_input_folder_is_named(tmp_path, capsys):
    assert run_here(tmp_path / "nowhere", tmp_path / "out") == 2
    (line,) = stderr_lines(capsys.readouterr().err)
    assert f"input folder {tmp_path / 'nowhere'} does not exist" in line
    assert not (tmp_path / "out").exists()


def test_an_empty_input_folder_says_no_clips_were_found(tmp_path, capsys):
    (tmp_path / "val" / "Happy").mkdir(parents=True)
    (tmp_path / "val" / ".DS_Store").write_bytes(b"x")
    assert run_here(tmp_path / "val", tmp_path / "out") == 2
    (line,) = stderr_lines(capsys.readouterr().err)
    assert f"no video clips found in {tmp_path / 'val'}" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- label files


def test_a_label_csv_takes_quoted_names_and_a_bom(tmp_path):
    """Quoted names with spaces and commas were refused; a BOM made the first clip `\\ufeff001`."""
    path = tmp_path / "labels.csv"
    path.write_bytes('\ufeff001,Happy\n"my clip, take 2.mp4",Sad\r\nplain name.mp4 , 3\n\n"odd ""quote""",0,\n'
                     .encode("utf-8"))
    assert read_label_file(path) == {"001": "Happy", "my clip, take 2": "Sad", "plain name": "3",
                                     'odd "quote"': "0"}
    path.write_bytes("\ufeffclip,label\n001,Happy\n".encode("utf-8"))
    assert read_label_file(path) == {"001": "Happy"}


@pytest.mark.parametrize("text, message", [
    ("a,Happy\na.mp4,Sad\n", "keep one label per clip"),
    ("a,b,c\n", "got 3 fields"),
    (",Happy\n", "is not a clip or file name"),
])
def test_label_files_that_cannot_be_read_right_are_refused(tmp_path, text, message):
    from emotiw.errors import UserError

    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_label_file(path)
    path.write_bytes(b"a,\xff\n")
    with pytest.raises(UserError, match="not UTF-8"):
        read_label_file(path)


# ------------------------------------------------------------------------- signals and workers


@pytest.mark.parametrize("how", ["SIGTERM to the run", "Ctrl-C to its process group"])
def test_a_stopped_run_stops_its_workers_at_once_and_a_rerun_resumes(clips, reference, tmp_path, how):
    """SIGTERM waited for every pending clip (the pool's shutdown), and before that left the
    workers running; now: exit 143 (130 for Ctrl-C), one line, no process left, and a rerun ends
    as an uninterrupted run does."""
    out = tmp_path / "out"
    # as a terminal's foreground job: Ctrl-C acts even when this test runs with SIGINT ignored
    # (`make test &` in a script, or under nohup), which the run would inherit
    as_foreground = dict(preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    with two_workers_at_work(clips, out, start_new_session=True, **as_foreground) as (process, _):
        if how.startswith("SIGTERM"):
            process.send_signal(signal.SIGTERM)
        else:  # the terminal sends Ctrl-C to every process of the foreground group
            os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    if how.startswith("SIGTERM"):
        assert (process.returncode, stderr_lines(err)) == (143, ["emotiw preprocess: stopped by SIGTERM"])
    else:
        assert (process.returncode, stderr_lines(err)) == (130, ["emotiw preprocess: interrupted"])
    assert len(finished(out)) < CLIPS  # the pending clips were cancelled, not run to the end
    assert run_here(clips, out) == 0
    assert snapshot(out) == snapshot(reference)


def test_workers_die_with_a_killed_run(clips, tmp_path):
    with two_workers_at_work(clips, tmp_path / "out"):
        pass  # leaving the block SIGKILLs the run; its workers must go with it


def test_a_worker_killed_mid_run_is_one_line(clips, tmp_path):
    """A worker killed (the out-of-memory killer) ended the run with BrokenProcessPool's traceback."""
    with two_workers_at_work(clips, tmp_path / "out") as (process, _):
        os.kill(min(workers_of(process.pid)), signal.SIGKILL)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    (line,) = stderr_lines(err)
    assert "a worker process ended abruptly" in line


def test_a_second_run_into_the_same_output_is_refused(clips, reference, tmp_path, capsys):
    out = tmp_path / "out"
    process = start(clips, out)
    try:
        wait_for(lambda: (out / "preprocess.json").exists(), process)
        assert run_here(clips, out) == 2
        (line,) = stderr_lines(capsys.readouterr().err)
        assert f"another emotiw preprocess is writing into {out}" in line
    finally:
        process.kill()
        process.wait()
    assert (out / ".lock").exists()  # a killed run leaves the file, but not its lock
    assert run_here(clips, out) == 0
    assert snapshot(out) == snapshot(reference)


# ------------------------------------------------------------------------- a full disk, a read-only OUT


def limit_file_size(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_write_that_fails_stops_the_run_and_a_rerun_completes(clips, reference, tmp_path):
    """A write error was a clip's "internal error", listed, and the run went on with the next."""
    out = tmp_path / "out"
    process = start(clips, out, preexec_fn=limit_file_size(4096))  # preprocess.json fits, a crop does not
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    (line,) = stderr_lines(err)
    assert "cannot write" in line and "File too large" in line and "ulimit -f" in line
    assert "/faces/clips/c0/" in line
    assert not finished(out) and not (out / "errors.csv").exists()
    assert run_here(clips, out) == 0
    assert snapshot(out) == snapshot(reference)


def used_bytes(out):
    return sum(-(-path.stat().st_size // 4096) * 4096 for path in out.rglob("*") if path.is_file())


def test_a_full_disk_stops_the_run_and_a_rerun_with_space_completes(clips, reference, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", used_bytes(reference) // 2) as disk:
        out = disk / "out"
        assert run_here(clips, out) == 2
        (line,) = stderr_lines(capsys.readouterr().err)
        assert "No space left on device; free disk space" in line
        assert 0 < len(finished(out)) < CLIPS  # it stopped in the middle
        assert not (out / "manifest.csv").exists()
        remount(disk, f"size={4 * used_bytes(reference)}")
        assert run_here(clips, out) == 0
        assert snapshot(out) == snapshot(reference)


def test_a_read_only_output_is_one_line(clips, reference, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", 1 << 20) as disk:
        (disk / "old").mkdir()
        remount(disk, "ro")
        for out, message in ((disk / "new", f"cannot create the output folder {disk / 'new'}: Read-only"),
                             (disk / "old", f"cannot write {disk / 'old' / '.lock'}: Read-only file system; make")):
            assert run_here(clips, out) == 2
            (line,) = stderr_lines(capsys.readouterr().err)
            assert message in line


def test_an_output_path_through_a_file_is_one_line(clips, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert run_here(clips, tmp_path / "file" / "out") == 2
    (line,) = stderr_lines(capsys.readouterr().err)
    assert f"cannot create the output folder {tmp_path / 'file' / 'out'}: Not a directory" in line

"""emotiw.face.track: linking boxes into tracks and choosing a clip's subject."""

import numpy as np
import pytest

from emotiw.face.track import MAX_GAP, choose_subject, facenet_choice, iou_matrix, link_tracks


def box(x, y, size):
    return [x, y, x + size, y + size]


def test_iou_of_known_boxes():
    ious = iou_matrix([box(0, 0, 10)], [box(0, 0, 10), box(5, 0, 10), box(20, 20, 5)])
    # half-overlapping squares: intersection 50, union 150
    assert ious[0] == pytest.approx([1.0, 50 / 150, 0.0])
    assert iou_matrix(np.zeros((0, 4)), [box(0, 0, 1)]).shape == (0, 1)


def test_the_longer_track_stays_the_subject_when_the_other_face_grows_larger():
    frames = []
    for t in range(10):
        subject = box(10 + 3 * t, 20, 60)
        other = box(150, 40, 40 + 8 * t)  # larger than the subject from t = 3 on
        faces = [other, subject] if t % 2 else [subject, other]  # detector order varies
        frames.append(faces if t >= 2 else [subject])
    chosen = choose_subject(frames).chosen
    for faces, k in zip(frames, chosen):
        assert faces[k][1] == 20  # always the subject's box, never the other face
    tracks = link_tracks(frames)
    assert sorted(t.length for t in tracks) == [8, 10]


def test_a_face_moving_most_of_its_width_between_kept_frames_keeps_its_track():
    # 30 px steps of a 40 px face: plain IoU 0.14, too little; the grown boxes overlap
    frames = [[box(30 * t, 50, 40)] for t in range(6)]
    assert iou_matrix([frames[0][0]], [frames[1][0]])[0, 0] < 0.3
    assert [t.length for t in link_tracks(frames)] == [6]


def test_frames_without_the_subject_are_reported_missing():
    frames = [[box(10, 10, 50)], [], [box(12, 10, 50)], [box(200, 150, 30)], [box(14, 10, 50)]]
    subject = choose_subject(frames)
    assert subject.chosen == [0, None, 0, None, 0]
    assert subject.track_ids == [[0], [], [0], [1], [0]]


def test_no_detection_at_all_gives_no_subject():
    for rule in ("track", "facenet"):
        assert choose_subject([[], np.zeros((0, 4)), []], rule, image_shape=(10, 10)).chosen == [None] * 3


def test_equal_lengths_go_to_the_larger_mean_box():
    frames = [[box(0, 0, 20), box(100, 100, 40)] for _ in range(4)]
    assert choose_subject(frames).chosen == [1, 1, 1, 1]


def test_a_long_gap_starts_a_new_track():
    frames = [[box(0, 0, 50)]] + [[]] * (MAX_GAP + 1) + [[box(0, 0, 50)]] * 2
    tracks = link_tracks(frames)
    assert [t.length for t in tracks] == [1, 2]
    short_gap = [[box(0, 0, 50)]] + [[]] * MAX_GAP + [[box(0, 0, 50)]]
    assert [t.length for t in link_tracks(short_gap)] == [2]


def test_facenet_prefers_big_central_faces():
    image_shape = (200, 300, 3)
    central = [130, 80, 170, 120]  # 40x40 at the centre: 1600 - 0
    corner = [0, 0, 60, 60]  # 60x60, centre 120 px right and 70 px up: 3600 - 2 * (120^2 + 70^2) < 0
    assert facenet_choice([corner, central], image_shape) == 1
    huge_corner = [0, 0, 150, 150]  # 22500 - 2 * (75^2 + 25^2) = 10000 > 1600
    assert facenet_choice([central, huge_corner], image_shape) == 1


def test_a_cut_ends_every_track_and_each_shot_has_its_subject():
    # shot 0: A long, B short; shot 1 (same places): B long, A short. Without the cut, each
    # track would run through both shots and one face would be the subject of both.
    a, b = box(10, 10, 50), box(200, 10, 60)
    frames = [[a, b]] * 2 + [[a]] * 4 + [[a, b]] * 2 + [[b]] * 4
    shots = [0] * 6 + [1] * 6
    subject = choose_subject(frames, "track", shots)
    assert [frames[p][k][0] if k is not None else None for p, k in enumerate(subject.chosen)] == [10] * 6 + [200] * 6
    assert [t.shot for t in link_tracks(frames, shots)] == [0, 0, 1, 1]
    assert [t.length for t in link_tracks(frames)] == [8, 8]


def test_facenet_rule_picks_in_every_frame_whatever_the_tracks():
    central, corner = box(130, 80, 40), box(0, 0, 60)
    frames = [[corner, central], [corner], [], [central]]
    subject = choose_subject(frames, "facenet", image_shape=(200, 300))
    assert subject.chosen == [1, 0, None, 0]
    assert subject.track_ids == [[0, 1], [0], [], [1]]


def test_a_face_that_leaves_and_comes_back_stays_the_subject_but_a_bystander_does_not():
    subject, elsewhere, bystander = box(10, 10, 50), box(300, 200, 50), box(150, 10, 40)
    gone = [[]] * (MAX_GAP + 5)
    # the subject leaves, a bystander shows up while the subject is away, the subject returns elsewhere
    frames = [[subject]] * 6 + gone + [[elsewhere, bystander]] * 3 + [[elsewhere]] * 5
    chosen = choose_subject(frames, "track").chosen
    assert [frames[p][k] if k is not None else None for p, k in enumerate(chosen)] == \
        [subject] * 6 + [None] * len(gone) + [elsewhere] * 8
    assert len(link_tracks(frames)) == 3

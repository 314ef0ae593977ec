"""Tests for ssd.data.annotations (parsers, box cleanup) and ssd.data.sequences (frame ids,
video grouping, clips, splits)."""

from __future__ import annotations

import pytest

from ssd.data import annotations as ann
from ssd.data import sequences as seq


def _voc(objects: str, size: str = "<size><width>64</width><height>48</height><depth>3</depth></size>") -> str:
    return f"<annotation><filename>a.jpg</filename>{size}{objects}</annotation>"


def _obj(name: str = "cat", box: tuple = (1, 2, 30, 40), difficult: str | None = "0") -> str:
    d = f"<difficult>{difficult}</difficult>" if difficult is not None else ""
    b = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name>{d}<bndbox>{b}</bndbox></object>"


# ---------------------------------------------------------------------------
# VOC XML


def test_voc_record_fields():
    rec = ann.parse_voc_xml(_voc(_obj("cat", (1, 2, 30, 40)) + _obj(" dog ", (5.5, 6, 7, 8), "1")))
    assert (rec.filename, rec.width, rec.height) == ("a.jpg", 64, 48)
    assert rec.objects == (
        ann.VocObject("cat", (1.0, 2.0, 30.0, 40.0), False),
        ann.VocObject("dog", (5.5, 6.0, 7.0, 8.0), True),
    )


def test_voc_accepts_bytes_and_no_objects_and_no_size():
    rec = ann.parse_voc_xml(_voc("", size="").encode())
    assert rec.objects == () and rec.width is None and rec.height is None


def test_voc_track_id():
    text = _voc("<object><name>car</name><track_id>7</track_id><bndbox><xmin>1</xmin><ymin>1</ymin>"
                "<xmax>5</xmax><ymax>5</ymax></bndbox></object>" + _obj())
    assert [o.track_id for o in ann.parse_voc_xml(text).objects] == [7, None]


def test_voc_missing_difficult_is_false():
    assert ann.parse_voc_xml(_voc(_obj(difficult=None))).objects[0].difficult is False


def test_voc_unusable_size_is_none():
    rec = ann.parse_voc_xml(_voc("", size="<size><width>abc</width><height>0</height></size>"))
    assert rec.width is None and rec.height is None


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<annotation><object>", ann.MALFORMED_XML),
        ("not xml at all", ann.MALFORMED_XML),
        ("<other/>", ann.MALFORMED_XML),
        (_voc("<object><name>cat</name></object>"), ann.MISSING_BNDBOX),
        (_voc("<object><name>cat</name><bndbox><xmin>1</xmin></bndbox></object>"), ann.MISSING_BNDBOX),
        (_voc(_obj(box=(1, "two", 3, 4))), ann.NON_NUMERIC_COORDINATE),
        (_voc(_obj(box=(1, 2, "nan", 4))), ann.NON_NUMERIC_COORDINATE),
        (_voc(_obj(box=(1, 2, "", 4))), ann.NON_NUMERIC_COORDINATE),
        (_voc("<object><bndbox/></object>"), ann.MALFORMED_XML),
    ],
)
def test_voc_errors(text, reason):
    with pytest.raises(ann.AnnotationError) as e:
        ann.parse_voc_xml(text)
    assert e.value.reason == reason
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# Box lists and MOT


def test_box_list_formats_and_empty_frames():
    text = "10 20 5 6\n0 0 0 0\n\n1,2,3,4\nnan nan nan nan\n 7 , 8\t9 10 \n1 1 2 2 3 3 4 4\n"
    assert ann.parse_box_list(text) == [
        [(10.0, 20.0, 15.0, 26.0)],
        [],
        [],
        [(1.0, 2.0, 4.0, 6.0)],
        [],
        [(7.0, 8.0, 16.0, 18.0)],
        [(1.0, 1.0, 3.0, 3.0), (3.0, 3.0, 7.0, 7.0)],
    ]


def test_box_list_final_newline_is_not_a_frame_but_blank_lines_are():
    assert len(ann.parse_box_list("1 1 1 1\n2 2 2 2")) == 2
    assert len(ann.parse_box_list("1 1 1 1\n2 2 2 2\n")) == 2
    assert len(ann.parse_box_list("1 1 1 1\n2 2 2 2\n\n")) == 3


def test_box_list_negative_size_is_kept_for_cleanup_to_judge():
    assert ann.parse_box_list("10 10 -5 5") == [[(10.0, 10.0, 5.0, 15.0)]]


@pytest.mark.parametrize("text", ["1 2 3\n", "1 2 x 4\n", "1 2 3 4 5\n", "1 2 inf 4\n"])
def test_box_list_errors(text):
    with pytest.raises(ann.AnnotationError) as e:
        ann.parse_box_list(text)
    assert e.value.reason == ann.MALFORMED_BOX_LIST and "line 1" in str(e.value)


def test_mot_rows_by_frame():
    text = "1,7,10,20,5,6,1,2,0.9\n1,8,0,0,3,3,0,1,1\n\n3,7,11,21,5,6\n"
    rows = ann.parse_mot(text)
    assert sorted(rows) == [1, 3]
    assert rows[1] == [
        ann.TrackBox((10.0, 20.0, 15.0, 26.0), 2, 7, False),
        ann.TrackBox((0.0, 0.0, 3.0, 3.0), 1, 8, True),  # conf 0: ignore in evaluation
    ]
    assert rows[3] == [ann.TrackBox((11.0, 21.0, 16.0, 27.0), 1, 7, False)]  # defaults: class 1, conf 1


@pytest.mark.parametrize(
    "text", ["1,2,3,4,5\n", "1,2,a,4,5,6\n", "-1,2,3,4,5,6\n", "1.5,2,3,4,5,6\n", "1,2,nan,4,5,6\n"]
)
def test_mot_errors(text):
    with pytest.raises(ann.AnnotationError) as e:
        ann.parse_mot(text)
    assert e.value.reason == ann.MALFORMED_MOT


# ---------------------------------------------------------------------------
# Frame ids, grouping, clips, splits


@pytest.mark.parametrize(
    "frame_id, expected",
    [
        ("seq01_000123", ("seq01", 123)),
        ("seq-01_7", ("seq-01", 7)),
        ("walk-f10", ("walk", 10)),
        ("a_b_c_0002", ("a_b_c", 2)),
    ],
)
def test_split_frame_id_default(frame_id, expected):
    assert seq.split_frame_id(frame_id) == expected


def test_split_frame_id_custom_pattern():
    assert seq.split_frame_id("cam3.frame42", r"^(?P<video>\w+)\.frame(?P<frame>\d+)$") == ("cam3", 42)


@pytest.mark.parametrize("frame_id", ["noframe", "_12", "video_12a"])
def test_split_frame_id_no_match(frame_id):
    with pytest.raises(ann.AnnotationError) as e:
        seq.split_frame_id(frame_id)
    assert e.value.reason == ann.BAD_FRAME_ID


def test_frame_pattern_needs_both_groups():
    with pytest.raises(ValueError, match="frame"):
        seq.compile_frame_pattern(r"(?P<video>.+)_\d+")
    with pytest.raises(ValueError, match="invalid"):
        seq.compile_frame_pattern(r"(")


def test_natural_key_and_trailing_number():
    assert sorted(["f10", "f2", "f1", "e9"], key=seq.natural_key) == ["e9", "f1", "f2", "f10"]
    assert seq.trailing_number("frame_0012") == 12
    assert seq.trailing_number("img12_v2") == 2
    assert seq.trailing_number("cover") is None


def test_group_videos_orders_by_number_not_string():
    ids = [f"walk_f{n}" for n in (10, 2, 1, 3, 9, 4, 5, 6, 7, 8)]
    entries = [(*seq.split_frame_id(i), i) for i in ids]
    segments, duplicates = seq.group_videos(entries)
    assert duplicates == []
    assert [s.items for s in segments] == [tuple(f"walk_f{n}" for n in range(1, 11))]
    assert segments[0].frames == tuple(range(1, 11))


def test_group_videos_gaps_start_new_segments():
    entries = [("v", n, n) for n in (1, 2, 3, 5, 6, 9)] + [("u", 4, "u4")]
    segments, _ = seq.group_videos(entries, max_gap=0)
    assert [(s.video, s.segment, s.frames) for s in segments] == [
        ("u", 0, (4,)),
        ("v", 0, (1, 2, 3)),
        ("v", 1, (5, 6)),
        ("v", 2, (9,)),
    ]
    segments, _ = seq.group_videos(entries, max_gap=1)  # one missing frame tolerated
    assert [s.frames for s in segments if s.video == "v"] == [(1, 2, 3, 5, 6), (9,)]
    segments, _ = seq.group_videos(entries, max_gap=2)
    assert [s.frames for s in segments if s.video == "v"] == [(1, 2, 3, 5, 6, 9)]


def test_group_videos_reports_duplicate_frame_numbers():
    segments, duplicates = seq.group_videos([("v", 1, "v_1"), ("v", 2, "v_2"), ("v", 1, "v_001")])
    assert segments[0].items == ("v_1", "v_2")
    assert [d[0] for d in duplicates] == ["v_001"]


@pytest.mark.parametrize(
    "n, length, stride, expected",
    [
        (10, 4, 4, [0, 4, 6]),
        (8, 4, 4, [0, 4]),
        (4, 4, 4, [0]),
        (3, 4, 4, []),
        (7, 4, 2, [0, 2, 3]),
        (5, 1, 1, [0, 1, 2, 3, 4]),
    ],
)
def test_clip_starts(n, length, stride, expected):
    assert seq.clip_starts(n, length, stride) == expected


def test_clip_starts_cover_every_frame():
    for n in range(1, 30):
        for length in range(1, 7):
            for stride in range(1, length + 1):
                covered = {s + i for s in seq.clip_starts(n, length, stride) for i in range(length)}
                assert covered == (set(range(n)) if n >= length else set())
                assert all(s + length <= n for s in seq.clip_starts(n, length, stride))


@pytest.mark.parametrize("length, stride", [(4, 5), (4, 0), (0, 1)])
def test_clip_starts_rejects_strides_that_drop_frames(length, stride):
    with pytest.raises(ValueError):
        seq.clip_starts(10, length, stride)


def test_split_videos_deterministic_whole_videos():
    names = [f"vid{i}" for i in range(10)]
    a = seq.split_videos(names, 0.3)
    assert a == seq.split_videos(list(reversed(names)), 0.3)  # listing order does not matter
    assert sorted(a) == sorted(names)
    assert sum(v == "val" for v in a.values()) == 3
    # Adding a video moves no other video.
    b = seq.split_videos(names + ["vid10"], 0.3)
    moved = [n for n in names if a[n] != b[n]]
    assert len(moved) <= 1


def test_split_videos_edge_cases():
    # At least one val video as soon as there are two videos and val_fraction > 0; never all of them.
    assert sorted(seq.split_videos(["a", "b"], 0.1).values()) == ["train", "val"]
    assert sorted(seq.split_videos(["a", "b", "c"], 0.01).values()) == ["train", "train", "val"]
    assert sorted(seq.split_videos(["a", "b"], 0.9).values()) == ["train", "val"]
    assert seq.split_videos(["only"], 0.5) == {"only": "train"}
    assert set(seq.split_videos(["a", "b"], 0.0).values()) == {"train"}
    with pytest.raises(ValueError):
        seq.split_videos(["a"], 1.0)


# ---------------------------------------------------------------------------
# Box cleanup


def test_clean_box_voc_conversion():
    assert ann.clean_box((1, 1, 64, 48), 64, 48, voc=True) == ann.BoxCheck((0.0, 0.0, 64.0, 48.0), None)
    assert ann.clean_box((11, 21, 30, 40), 64, 48, voc=True) == ann.BoxCheck((10.0, 20.0, 30.0, 40.0), None)


@pytest.mark.parametrize(
    "corners, voc, expected",
    [
        ((30, 5, 10, 20), True, ann.BoxCheck(None, ann.INVERTED_BOX)),
        ((5, 30, 10, 20), False, ann.BoxCheck(None, ann.INVERTED_BOX)),
        ((504, 337, 504, 337), True, ann.BoxCheck(None, ann.ZERO_AREA_BOX)),  # a click without a drag
        ((5, 5, 5, 9), False, ann.BoxCheck(None, ann.ZERO_AREA_BOX)),
        ((0, 0, 70, 20), True, ann.BoxCheck((0.0, 0.0, 64.0, 20.0), ann.BOX_CLIPPED)),
        ((-5, 10, 10, 60), False, ann.BoxCheck((0.0, 10.0, 10.0, 48.0), ann.BOX_CLIPPED)),
        ((100, 5, 120, 20), False, ann.BoxCheck(None, ann.BOX_OUTSIDE)),
        ((66, 5, 120, 20), True, ann.BoxCheck(None, ann.BOX_OUTSIDE)),  # x1 = 65 > 64
        ((-9, -9, 0, 0), False, ann.BoxCheck(None, ann.BOX_OUTSIDE)),
    ],
)
def test_clean_box_policy(corners, voc, expected):
    assert ann.clean_box(corners, 64, 48, voc=voc) == expected

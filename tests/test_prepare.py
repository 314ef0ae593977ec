"""Tests for the ``prepare`` stage on tiny datasets generated here, and on ../shared/data when present."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import prepare as stage
from ssd.data.sources import report as reasons
from pipeline.prepare import main
from ssd.data import annotations as ann
from ssd.data import sequences as seq
from ssd.atomic import TMP_PREFIX
from ssd.data.shards import SHARD_NAME, iter_samples

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
W, H = 40, 30  # generated image size


# ---------------------------------------------------------------------------
# Generated inputs


def _pixels(seed: int, w: int = W, h: int = H, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w, channels) if channels > 1 else (h, w)
    return rng.integers(0, 255, shape, dtype=np.uint8)


def _jpeg(seed: int = 0, w: int = W, h: int = H) -> bytes:
    return cv2.imencode(".jpg", _pixels(seed, w, h))[1].tobytes()


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def _palette_png(seed: int) -> bytes:
    """An 8-bit palette PNG (colour type 3), built by hand: OpenCV cannot write one."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    idx = _pixels(seed, channels=1) % 4
    raw = b"".join(b"\x00" + row.tobytes() for row in idx)
    palette = bytes([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 3, 0, 0, 0))
        + chunk(b"PLTE", palette)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _xml(objects, size=(W, H)) -> str:
    """objects: (name, (xmin, ymin, xmax, ymax)[, difficult[, track id]])."""
    parts = ["<annotation><folder>JPEGImages</folder>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, box, *rest in objects:
        d = int(rest[0]) if rest else 0
        track = f"<track_id>{rest[1]}</track_id>" if len(rest) > 1 else ""
        b = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        parts.append(f"<object><name>{name}</name><difficult>{d}</difficult>{track}<bndbox>{b}</bndbox></object>")
    parts.append("</annotation>")
    return "".join(parts)


def make_voc(root: Path, items: dict, splits: dict, image_dir: str = "JPEGImages") -> Path:
    """items: id -> objects (see _xml); splits: name -> ids. JPEG images, one seed per id."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for i, (id_, objects) in enumerate(items.items()):
        (root / "Annotations" / f"{id_}.xml").write_text(_xml(objects))
        (root / image_dir / f"{id_}.jpg").write_bytes(_jpeg(i))
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


BASE_ITEMS = {
    "a": [("cat", (1, 1, 10, 10)), ("dog", (5, 6, 20, 25), True)],
    "b": [("cat", (11, 5, 30, 20)), ("dog", (2, 2, 8, 8))],
    "c": [("dog", (1, 1, 40, 30))],
    "d": [("cat", (3, 3, 9, 12))],
}
BASE_SPLITS = {"train": ["a", "b", "c"], "val": ["d"]}


def run_stage(tmp_path: Path, *overrides: str, strict: bool = False, workers: int = 1, out: str = "out",
              allow_empty: bool = True) -> int:
    """Run ``prepare`` in-process with outputs under ``tmp_path/out``; returns its exit code.

    ``allow_empty``: the tiny datasets here often leave a split empty, which is otherwise exit 2.
    """
    params = tmp_path / "params.yaml"
    if not params.exists():
        params.write_text("prepare: {}\n")
    argv = ["--params", str(params), "--set", f"workers={workers}", "--set", f"allow_empty_splits={allow_empty}"]
    argv += ["--set", f"voc.out={tmp_path / out / 'voc'}", "--set", f"ir.out={tmp_path / out / 'ir'}"]
    for o in overrides:
        argv += ["--set", o]
    if strict:
        argv.append("--strict")
    return main(argv)


def voc_run(tmp_path: Path, *overrides: str, **kw) -> int:
    return run_stage(tmp_path, f"voc.root={tmp_path / 'voc'}", "ir.enabled=false", *overrides, **kw)


def manifest(tmp_path: Path, name: str = "voc", out: str = "out") -> dict:
    return json.loads((tmp_path / out / name / "manifest.json").read_text())


def samples(tmp_path: Path, name: str = "voc", out: str = "out") -> list[dict]:
    """All samples with their JSON decoded and the split (from the shard name) added."""
    result = []
    for s in iter_samples(tmp_path / out / name):
        s["meta"] = json.loads(s["json"])
        s["split"] = SHARD_NAME.match(s["__shard__"]).group("split")
        result.append(s)
    return result


def entries(m: dict, bucket: str) -> set[tuple[str, str]]:
    return {(Path(e["file"]).name, e["reason"]) for e in m[bucket]}


# ---------------------------------------------------------------------------
# VOC frames


def test_voc_every_annotation_once_with_converted_boxes(tmp_path):
    items = dict(BASE_ITEMS, e=[])  # e: an empty annotation is a background sample
    make_voc(tmp_path / "voc", items, {"train": ["a", "b", "c", "e"], "val": ["d"]})
    assert voc_run(tmp_path) == 0
    m = manifest(tmp_path)
    got = samples(tmp_path)
    assert Counter(s["meta"]["id"] for s in got) == Counter(list(items))  # every id exactly once
    assert m["classes"] == ["cat", "dog"]  # discovered, sorted
    assert {s: v["samples"] for s, v in m["splits"].items()} == {"train": 4, "val": 1}
    assert m["splits"]["train"]["boxes"] == 5 and m["skipped"] == [] and m["fixed"] == []
    a = next(s for s in got if s["meta"]["id"] == "a")
    assert a["__key__"] == "a" and a["split"] == "train"
    assert a["meta"] == {
        "id": "a",
        "width": W,
        "height": H,
        "boxes": [[0.0, 0.0, 10.0, 10.0], [4.0, 5.0, 20.0, 25.0]],  # VOC 1-based -> pixels
        "labels": [0, 1],
        "difficult": [False, True],
    }
    assert a["jpg"] == (tmp_path / "voc" / "JPEGImages" / "a.jpg").read_bytes()  # JPEG kept byte for byte
    e = next(s for s in got if s["meta"]["id"] == "e")
    assert e["meta"]["boxes"] == [] and e["meta"]["labels"] == []


def test_the_manifest_changes_with_the_shards_bytes(tmp_path):
    """A corrected box keeps every shard's size (tar pads to 10 KiB records) and the manifest's
    counts, so a resumed training took the re-prepared data for the data it started on, and
    trained on old and new labels in one run. The manifest now holds each shard's SHA-256."""
    import hashlib

    make_voc(tmp_path / "voc", BASE_ITEMS, BASE_SPLITS)
    assert voc_run(tmp_path) == 0
    before = manifest(tmp_path)
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "out" / "voc").glob("*.tar")}
    for split in ("train", "val"):
        assert before["splits"][split]["sha256"] == {
            name: hashlib.sha256((tmp_path / "out" / "voc" / name).read_bytes()).hexdigest()
            for name in before["splits"][split]["shards"]}
    make_voc(tmp_path / "voc", dict(BASE_ITEMS, b=[("cat", (12, 5, 30, 20)), ("dog", (2, 2, 8, 8))]), BASE_SPLITS)
    assert voc_run(tmp_path) == 0
    assert {p.name: p.stat().st_size for p in (tmp_path / "out" / "voc").glob("*.tar")} == sizes
    after = manifest(tmp_path)
    assert after["splits"]["train"]["sha256"] != before["splits"]["train"]["sha256"]
    assert after["splits"]["val"]["sha256"] == before["splits"]["val"]["sha256"]


def test_voc_configured_classes_order_labels(tmp_path):
    make_voc(tmp_path / "voc", BASE_ITEMS, BASE_SPLITS)
    assert voc_run(tmp_path, "voc.classes=[dog, cat]") == 0
    assert manifest(tmp_path)["classes"] == ["dog", "cat"]
    a = next(s for s in samples(tmp_path) if s["meta"]["id"] == "a")
    assert a["meta"]["labels"] == [1, 0]


def test_voc_keys_have_no_dots(tmp_path):
    make_voc(tmp_path / "voc", {"img.v2": [("cat", (1, 1, 5, 5))]}, {"train": ["img.v2"], "val": []})
    assert voc_run(tmp_path) == 0
    (s,) = samples(tmp_path)
    assert s["__key__"] == "img_v2" and s["meta"]["id"] == "img.v2"


def _garbage(root):
    (root / "JPEGImages" / "b.jpg").write_bytes(b"this is not an image" * 20)


def _truncate(root):
    p = root / "JPEGImages" / "b.jpg"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _set_objects(objects, size=(W, H)):
    def f(root):
        (root / "Annotations" / "b.xml").write_text(_xml(objects, size))

    return f


def _write_xml(text):
    def f(root):
        (root / "Annotations" / "b.xml").write_text(text)

    return f


def _png_b(array):
    def f(root):
        (root / "JPEGImages" / "b.jpg").unlink()
        (root / "JPEGImages" / "b.png").write_bytes(array if isinstance(array, bytes) else _png(array))

    return f


def _list_twice(root):
    (root / "ImageSets" / "Main" / "val.txt").write_text("d\nb\n")


def _list_missing(root):
    (root / "ImageSets" / "Main" / "val.txt").write_text("d\nghost\n")


def _unlisted(root):
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nc\n")


def _bom_list(root):
    (root / "ImageSets" / "Main" / "train.txt").write_bytes("\ufeffa\nb\nc\n".encode("utf-8"))


def _crlf_flag_list(root):
    (root / "ImageSets" / "Main" / "train.txt").write_bytes(b"a  1\r\nb -1\r\n  c 0\r\n")


def _rename_b(new: str):
    """Rename id b's files and list entry to ``new`` (written as the file system's bytes)."""

    def f(root):
        for sub, ext in (("Annotations", ".xml"), ("JPEGImages", ".jpg")):
            (root / sub / f"b{ext}").rename(root / sub / f"{new}{ext}")
        (root / "ImageSets" / "Main" / "train.txt").write_bytes(b"a\n" + os.fsencode(new) + b"\nc\n")

    return f


KEEP_ALL = {"a", "b", "c", "d"}
KEEP_NO_B = {"a", "c", "d"}

# (mutation, bucket, file, reason, ids kept, a defect that --strict stops at, extra overrides)
BAD_INPUTS = {
    "corrupt image": (_garbage, "skipped", "b.jpg", reasons.CORRUPT_IMAGE, KEEP_NO_B, True, ()),
    "truncated image": (_truncate, "skipped", "b.jpg", reasons.CORRUPT_IMAGE, KEEP_NO_B, True, ()),
    "annotation without image": (
        lambda r: (r / "JPEGImages" / "b.jpg").unlink(), "skipped", "b.xml", reasons.ANNOTATION_WITHOUT_IMAGE,
        KEEP_NO_B, True, (),
    ),
    "image without annotation": (
        lambda r: (r / "Annotations" / "b.xml").unlink(), "skipped", "b.jpg", reasons.IMAGE_WITHOUT_ANNOTATION,
        KEEP_NO_B, True, (),
    ),
    "malformed XML": (_write_xml("<annotation><object>"), "skipped", "b.xml", ann.MALFORMED_XML, KEEP_NO_B, True, ()),
    "missing bndbox": (
        _write_xml("<annotation><object><name>cat</name></object></annotation>"), "skipped", "b.xml",
        ann.MISSING_BNDBOX, KEEP_NO_B, True, (),
    ),
    "non-numeric coordinate": (
        _set_objects([("cat", (1, "x", 5, 5))]), "skipped", "b.xml", ann.NON_NUMERIC_COORDINATE, KEEP_NO_B, True, (),
    ),
    "inverted box": (
        _set_objects([("cat", (20, 5, 10, 20)), ("dog", (2, 2, 8, 8))]), "skipped", "b.xml", ann.INVERTED_BOX,
        KEEP_ALL, True, (),
    ),
    "zero-area box": (
        _set_objects([("cat", (12, 5, 12, 20)), ("dog", (2, 2, 8, 8))]), "skipped", "b.xml", ann.ZERO_AREA_BOX,
        KEEP_ALL, True, (),
    ),
    "box outside the image": (
        _set_objects([("cat", (50, 5, 60, 20)), ("dog", (2, 2, 8, 8))]), "skipped", "b.xml", ann.BOX_OUTSIDE,
        KEEP_ALL, True, (),
    ),
    "box partly outside the image": (
        _set_objects([("cat", (30, 5, 60, 20)), ("dog", (2, 2, 8, 8))]), "fixed", "b.xml", ann.BOX_CLIPPED,
        KEEP_ALL, True, (),
    ),
    "size disagrees with the image": (
        _set_objects([("cat", (3, 3, 20, 20))], size=(2 * W, 2 * H)), "fixed", "b.xml", reasons.SIZE_MISMATCH,
        KEEP_ALL, True, (),
    ),
    "unknown class": (
        _set_objects([("cow", (3, 3, 20, 20)), ("dog", (2, 2, 8, 8))]), "skipped", "b.xml", reasons.UNKNOWN_CLASS,
        KEEP_ALL, True, ("voc.classes=[cat, dog]",),
    ),
    "empty annotation": (_set_objects([]), None, "b.xml", None, KEEP_ALL, False, ()),
    "grey-scale PNG": (
        _png_b(_pixels(1, channels=1)), "converted", "b.png", reasons.IMAGE_CONVERTED, KEEP_ALL, False, (),
    ),
    "RGBA PNG": (_png_b(_pixels(1, channels=4)), "converted", "b.png", reasons.IMAGE_CONVERTED, KEEP_ALL, False, ()),
    "palette PNG": (_png_b(_palette_png(1)), "converted", "b.png", reasons.IMAGE_CONVERTED, KEEP_ALL, False, ()),
    "16-bit PNG": (
        _png_b(_pixels(1).astype(np.uint16) * 257), "converted", "b.png", reasons.IMAGE_CONVERTED, KEEP_ALL, False, (),
    ),
    "id in two split lists": (_list_twice, "fixed", "b.xml", reasons.IN_TWO_SPLITS, KEEP_ALL, True, ()),
    "listed id without files": (_list_missing, "skipped", "val.txt", reasons.LISTED_BUT_MISSING, KEEP_ALL, True, ()),
    "id in no split list": (_unlisted, "skipped", "b.xml", reasons.NOT_IN_SPLIT, KEEP_NO_B, False, ()),
    # Split lists as editors and other systems write them: every id still found.
    "byte-order mark in a split list": (_bom_list, None, "", None, KEEP_ALL, False, ()),
    "Windows line ends and a per-class flag": (_crlf_flag_list, None, "", None, KEEP_ALL, False, ()),
    "id with a space": (_rename_b("b 2"), None, "", None, {"a", "b 2", "c", "d"}, False, ()),
    "id with bytes that are not UTF-8": (_rename_b(os.fsdecode(b"b\xe9")), None, "", None,
                                         {"a", os.fsdecode(b"b\xe9"), "c", "d"}, False, ()),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_voc_bad_input_is_reported_and_the_rest_converted(tmp_path, kind):
    mutate, bucket, file, reason, kept, _, extra = BAD_INPUTS[kind]
    mutate(make_voc(tmp_path / "voc", BASE_ITEMS, BASE_SPLITS))
    assert voc_run(tmp_path, *extra) == 0
    m = manifest(tmp_path)
    got = samples(tmp_path)
    assert Counter(s["meta"]["id"] for s in got) == Counter(kept)
    reported = [(b, e) for b in ("skipped", "fixed", "converted") for e in entries(m, b)]
    if bucket is None:
        assert reported == []
    else:
        assert reported == [(bucket, (file, reason))]
        assert m[f"{bucket}_counts"] == {reason: 1}
    b = next((s for s in got if s["meta"]["id"] == "b"), None)
    if kind in ("inverted box", "zero-area box", "box outside the image", "unknown class"):
        assert b["meta"]["boxes"] == [[1.0, 1.0, 8.0, 8.0]]  # the good box of b stays
    if kind == "unknown class":
        assert "'cow' (known: cat, dog)" in m["skipped"][0]["detail"]
    if kind == "box partly outside the image":
        assert b["meta"]["boxes"] == [[29.0, 4.0, 40.0, 20.0], [1.0, 1.0, 8.0, 8.0]]
    if kind == "size disagrees with the image":
        # The real size wins; the box, drawn on the 2x image, is scaled to the stored one.
        assert (b["meta"]["width"], b["meta"]["height"]) == (W, H)
        assert b["meta"]["boxes"] == [[1.0, 1.0, 10.0, 10.0]]
    if bucket == "converted":
        data = b["png"]
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and (data[24], data[25]) == (8, 2)  # 8-bit RGB
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).shape == (H, W, 3)
    if kind == "id in two split lists":
        assert b["split"] == "train"


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_voc_bad_input_under_strict(tmp_path, kind, capsys):
    mutate, _, file, reason, kept, defect, extra = BAD_INPUTS[kind]
    mutate(make_voc(tmp_path / "voc", BASE_ITEMS, BASE_SPLITS))
    rc = voc_run(tmp_path, *extra, strict=True)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if not defect:
        assert rc == 0
        return
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert file in errors[0] and reason in errors[0]
    assert not (tmp_path / "out" / "voc").exists()  # nothing half-written
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]


def test_voc_ir_sirst_layout_and_empty_split_file(tmp_path):
    """Configurable sub-directories (images/ + masks/ + idx/); a list without a final newline."""
    root = tmp_path / "sirst"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "idx").mkdir()
    for i in range(3):
        (root / "images" / f"Misc_{i}.png").write_bytes(_png(_pixels(i)))
        (root / "masks" / f"Misc_{i}.xml").write_text(_xml([("Target", (2, 2, 6, 6))]))
    (root / "masks" / "Misc_0_pixels0.png").write_bytes(_png(_pixels(9, channels=1)))  # not an annotation
    (root / "idx" / "train.txt").write_text("Misc_0\nMisc_1")
    (root / "idx" / "val.txt").write_text("Misc_2")
    rc = run_stage(
        tmp_path, f"voc.root={root}", "voc.annotations_dir=masks", "voc.images_dir=images", "voc.splits_dir=idx",
        "ir.enabled=false",
    )
    assert rc == 0
    m = manifest(tmp_path)
    assert {s: v["samples"] for s, v in m["splits"].items()} == {"train": 2, "val": 1}
    assert m["skipped"] == [] and m["converted"] == []  # 8-bit RGB PNGs are kept as they are
    got = {s["meta"]["id"]: s for s in samples(tmp_path)}
    assert got["Misc_1"]["png"] == (root / "images" / "Misc_1.png").read_bytes()


def test_missing_split_list_and_root_are_one_line_errors(tmp_path, capsys):
    make_voc(tmp_path / "voc", BASE_ITEMS, {"train": ["a"]})
    assert voc_run(tmp_path) == 2  # val.txt does not exist
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")
    assert run_stage(tmp_path, f"voc.root={tmp_path / 'nowhere'}", "ir.enabled=false") == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_a_second_prepare_into_the_same_folder_is_refused_while_one_runs(tmp_path, capsys):
    """Two prepares writing into one folder removed each other's temporary folder (each took the
    other's for one left by an interrupted run), and the first one failed."""
    import fcntl

    make_voc(tmp_path / "voc", BASE_ITEMS, BASE_SPLITS)
    assert voc_run(tmp_path) == 0
    before = manifest(tmp_path)
    other_run = os.open(tmp_path / "out", os.O_RDONLY)  # what the running prepare holds
    fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
    tmp = tmp_path / "out" / f"{TMP_PREFIX}voc.running"
    tmp.mkdir()  # the running one's temporary folder
    try:
        assert voc_run(tmp_path) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: {tmp_path / 'out'}: another prepare is writing its datasets here; wait for it to end")
        assert tmp.is_dir() and manifest(tmp_path) == before
    finally:
        os.close(other_run)
    assert voc_run(tmp_path) == 0 and not tmp.exists()  # alone again: a leftover is cleaned up


def test_prepare_s_lock_is_not_kept_by_forked_workers(tmp_path):
    """The decode pool's forked workers inherited the folder lock's descriptor: after a kill -9 of
    prepare, workers still alive kept the folder locked."""
    started, tell = os.pipe()
    with stage._alone_in(tmp_path):
        worker = os.fork()
        if worker == 0:
            os.write(tell, b"x")
            time.sleep(60)
            os._exit(0)
        assert os.read(started, 1) == b"x"
    try:
        with stage._alone_in(tmp_path):  # the worker lives on; the folder is free
            pass
    finally:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
        os.close(started)
        os.close(tell)


@pytest.mark.parametrize(
    "override, message",
    [
        ("voc.bogus=1", "prepare.voc.bogus: unknown key"),
        ("ir.clip_stride=9", "prepare.ir.clip_stride"),
        ("ir.frames.frame_id_pattern=(?P<video>.+)", "frame_id_pattern"),
        ("ir.source=other", "prepare.ir.source"),
        ("voc.splits=[]", "prepare.voc.splits"),
    ],
)
def test_config_errors(tmp_path, capsys, override, message):
    assert run_stage(tmp_path, override) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_disabled_datasets_still_get_a_manifest(tmp_path):
    assert run_stage(tmp_path, "voc.enabled=false", "ir.enabled=false") == 0
    assert manifest(tmp_path, "voc")["disabled"] is True
    assert manifest(tmp_path, "ir")["kind"] == "clips"


def test_a_disabled_dataset_keeps_its_shards_unless_dvc_runs_the_stage(tmp_path, monkeypatch):
    """`--set voc.enabled=false` (converting the IR data only, as the docs show) replaced the VOC
    shards with an empty 'disabled' output. Under DVC the output must exist, and is that manifest."""
    make_voc(tmp_path / "voc", BASE_ITEMS, BASE_SPLITS)
    assert voc_run(tmp_path) == 0
    converted = manifest(tmp_path)
    assert run_stage(tmp_path, "voc.enabled=false", "ir.enabled=false") == 0
    assert manifest(tmp_path) == converted
    monkeypatch.setenv("DVC_STAGE", "prepare")
    monkeypatch.setattr("pipeline.prepare.check_tracked", lambda *a, **k: None)  # no DVC project here
    assert run_stage(tmp_path, "voc.enabled=false", "ir.enabled=false") == 0
    assert manifest(tmp_path)["disabled"] is True


# ---------------------------------------------------------------------------
# IR format 1: VOC-layout frame sequences


def _track_box(video: str, n: int) -> tuple:
    """A box moving one pixel per frame (VOC corners), track id 5."""
    x = 2 + (n % 20)
    return ("target", (x, 3, x + 6, 10), 0, 5)


def make_ir_frames(root: Path, videos: dict[str, list[int]], splits: dict[str, list[str]]) -> dict[str, bytes]:
    """Frames ``<video>_f<n>`` (so that string order would put f10 before f2); returns id -> JPEG bytes."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    images = {}
    for v, (video, numbers) in enumerate(videos.items()):
        for n in numbers:
            id_ = f"{video}_f{n}"
            (root / "Annotations" / f"{id_}.xml").write_text(_xml([_track_box(video, n)]))
            images[id_] = _jpeg(100 * v + n)
            (root / "JPEGImages" / f"{id_}.jpg").write_bytes(images[id_])
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return images


def ir_frames_run(tmp_path: Path, *overrides: str, **kw) -> int:
    return run_stage(
        tmp_path, "voc.enabled=false", "ir.source=frames", f"ir.root={tmp_path / 'irf'}", "ir.clip_length=4",
        *overrides, **kw,
    )


def _ids(video: str, numbers) -> list[str]:
    return [f"{video}_f{n}" for n in numbers]


def test_ir_frames_clips(tmp_path):
    videos = {"walk": list(range(1, 12)), "run": [*range(1, 9), *range(10, 18)], "jog": [1, 2, 3]}
    splits = {"train": _ids("walk", videos["walk"]) + _ids("jog", [1, 2, 3]), "val": _ids("run", videos["run"])}
    images = make_ir_frames(tmp_path / "irf", videos, splits)
    assert ir_frames_run(tmp_path) == 0
    m = manifest(tmp_path, "ir")
    got = samples(tmp_path, "ir")
    for s in got:
        meta = s["meta"]
        assert len(meta["frames"]) == 4
        assert all(b - a == 1 for a, b in zip(meta["frames"], meta["frames"][1:]))  # consecutive, numeric order
        assert meta["ids"] == _ids(meta["video"], meta["frames"])  # one video per clip
        assert s["__key__"] == f"{meta['video']}_{meta['frames'][0]:06d}"
        assert [s[f"{j:03d}.jpg"] for j in range(4)] == [images[i] for i in meta["ids"]]  # JPEG kept
        for n, boxes, labels in zip(meta["frames"], meta["boxes"], meta["labels"]):
            _, (x1, y1, x2, y2), _, _ = _track_box(meta["video"], n)
            assert boxes == [[x1 - 1.0, y1 - 1.0, float(x2), float(y2)]] and labels == [0]
        assert meta["track_ids"] == [[5]] * 4  # from <track_id> in the frame XML
    frames_of = {(s["meta"]["video"], tuple(s["meta"]["frames"])) for s in got}
    assert frames_of == {
        ("walk", (1, 2, 3, 4)),
        ("walk", (5, 6, 7, 8)),
        ("walk", (8, 9, 10, 11)),  # the tail clip starts earlier: frame 8 twice
        ("run", (1, 2, 3, 4)),
        ("run", (5, 6, 7, 8)),
        ("run", (10, 11, 12, 13)),  # frame 9 is missing: a new segment, no clip across the gap
        ("run", (14, 15, 16, 17)),
    }
    # Every frame of the long videos appears; the repeats are exactly what the manifest says.
    seen = Counter(i for s in got for i in s["meta"]["ids"])
    expected = set(_ids("walk", videos["walk"]) + _ids("run", videos["run"]))
    assert set(seen) == expected
    assert sum(seen.values()) - len(seen) == m["frames_covered_twice"] == 1
    # Whole videos per split.
    split_of = {}
    for s in got:
        assert split_of.setdefault(s["meta"]["video"], s["split"]) == s["split"]
    assert split_of == {"walk": "train", "run": "val"}
    assert m["splits"]["train"]["videos"] == 1 and m["splits"]["val"]["videos"] == 1
    assert m["splits"]["val"]["segments"] == 2
    assert m["splits"]["train"]["frames"] == 11 and m["splits"]["train"]["samples"] == 3
    # The short video is reported, not silently dropped.
    assert entries(m, "skipped") == {("jog_f1.xml", reasons.SHORT_VIDEO)}


def test_ir_frames_max_gap_and_stride(tmp_path):
    videos = {"run": [*range(1, 9), *range(10, 18)]}
    make_ir_frames(tmp_path / "irf", videos, {"train": _ids("run", videos["run"]), "val": []})
    assert ir_frames_run(tmp_path, "ir.max_gap=1", "ir.clip_stride=2") == 0
    got = samples(tmp_path, "ir")
    # One segment of 16 frames (one missing frame tolerated); clips every 2 frames.
    assert [s["meta"]["frames"][0] for s in got] == [1, 3, 5, 7, 10, 12, 14]
    assert manifest(tmp_path, "ir")["frames_covered_twice"] == 7 * 4 - 16


def test_ir_frames_video_in_two_splits_goes_to_one(tmp_path):
    videos = {"walk": list(range(1, 9))}
    make_ir_frames(tmp_path / "irf", videos, {"train": _ids("walk", range(1, 5)), "val": _ids("walk", range(5, 9))})
    assert ir_frames_run(tmp_path) == 0
    assert {s["split"] for s in samples(tmp_path, "ir")} == {"train"}
    m = manifest(tmp_path, "ir")
    assert entries(m, "fixed") == {("walk_f1.xml", reasons.VIDEO_IN_TWO_SPLITS)}
    assert "goes to train" in m["fixed"][0]["detail"]
    assert m["splits"]["val"]["samples"] == 0


def test_ir_frames_corrupt_frame_splits_the_video(tmp_path, capsys):
    videos = {"walk": list(range(1, 10))}
    make_ir_frames(tmp_path / "irf", videos, {"train": _ids("walk", videos["walk"]), "val": []})
    (tmp_path / "irf" / "JPEGImages" / "walk_f4.jpg").write_bytes(b"\xff\xd8\xff broken")
    assert ir_frames_run(tmp_path) == 0
    m = manifest(tmp_path, "ir")
    # Frames 1-3 are too short for a clip once frame 4 is gone; 5-9 give two clips.
    assert entries(m, "skipped") == {("walk_f4.jpg", reasons.CORRUPT_IMAGE), ("walk_f1.xml", reasons.SHORT_VIDEO)}
    assert "frames 1..3" in next(e["detail"] for e in m["skipped"] if e["reason"] == reasons.SHORT_VIDEO)
    assert [s["meta"]["frames"] for s in samples(tmp_path, "ir")] == [[5, 6, 7, 8], [6, 7, 8, 9]]
    assert ir_frames_run(tmp_path, strict=True) == 2
    assert "walk_f4.jpg: corrupt or truncated image" in capsys.readouterr().err


def test_ir_frames_bad_id(tmp_path):
    videos = {"walk": list(range(1, 5))}
    make_ir_frames(tmp_path / "irf", videos, {"train": _ids("walk", videos["walk"]) + ["cover"], "val": []})
    (tmp_path / "irf" / "Annotations" / "cover.xml").write_text(_xml([]))
    (tmp_path / "irf" / "JPEGImages" / "cover.jpg").write_bytes(_jpeg(7))
    assert ir_frames_run(tmp_path) == 0
    assert entries(manifest(tmp_path, "ir"), "skipped") == {("cover.xml", ann.BAD_FRAME_ID)}
    assert len(samples(tmp_path, "ir")) == 1


# ---------------------------------------------------------------------------
# IR format 2: videos or frame folders, box lists or MOT gt.txt


def _frame_image(n: int) -> np.ndarray:
    """A distinct, smooth frame (survives JPEG) per number."""
    img = np.full((H, W, 3), (n * 23) % 200, np.uint8)
    img[5:15, n % 20 : n % 20 + 10] = 255
    return img


def _write_avi(path: Path, frames: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    assert writer.isOpened()
    for n in range(1, frames + 1):
        writer.write(_frame_image(n))
    writer.release()


def make_ir_video(root: Path, splits: dict | None = None) -> None:
    """clipA.avi (10 frames) + box list; clipB frame folder (9 PNGs) + MOT gt.txt with two classes."""
    for d in ("videos", "frames/clipB", "annotations/clipB"):
        (root / d).mkdir(parents=True, exist_ok=True)
    _write_avi(root / "videos" / "clipA.avi", 10)
    lines = [f"{n % 20} 5 10 10" if n % 3 else "0 0 0 0" for n in range(1, 11)]
    (root / "annotations" / "clipA.txt").write_text("\n".join(lines) + "\n")
    rows = []
    for n in range(1, 10):
        (root / "frames" / "clipB" / f"{n:06d}.png").write_bytes(_png(_frame_image(n)))
        rows.append(f"{n},1,{n},2,5,5,1,1,1")
        if n > 4:
            rows.append(f"{n},2,20,20,6,6,0,2,1")  # class 2, conf 0 -> difficult
    (root / "annotations" / "clipB" / "gt.txt").write_text("\n".join(rows) + "\n")
    if splits is not None:
        (root / "splits.json").write_text(json.dumps(splits))


def _renumber_from_zero(frames: Path, gt: Path) -> None:
    for p in sorted(frames.iterdir()):
        p.rename(p.with_name(f"{int(p.stem) - 1:06d}{p.suffix}"))
    gt.write_text("".join(line + "\n" for line in gt.read_text().splitlines() if not line.startswith("9,")))


def ir_video_run(tmp_path: Path, *overrides: str, **kw) -> int:
    return run_stage(
        tmp_path, "voc.enabled=false", "ir.source=video", f"ir.root={tmp_path / 'irv'}", "ir.clip_length=4",
        "ir.video.mot_classes=[target, bird]", *overrides, **kw,
    )


def test_ir_video_files_folders_box_lists_and_mot(tmp_path):
    make_ir_video(tmp_path / "irv", {"train": ["clipA"], "val": ["clipB"]})
    assert ir_video_run(tmp_path) == 0
    m = manifest(tmp_path, "ir")
    assert m["classes"] == ["bird", "target"]
    got = samples(tmp_path, "ir")
    by_video = {}
    for s in got:
        by_video.setdefault(s["meta"]["video"], []).append(s)
    assert [s["meta"]["frames"] for s in by_video["clipA"]] == [[1, 2, 3, 4], [5, 6, 7, 8], [7, 8, 9, 10]]
    assert [s["meta"]["frames"] for s in by_video["clipB"]] == [[1, 2, 3, 4], [5, 6, 7, 8], [6, 7, 8, 9]]
    assert {s["split"] for s in by_video["clipA"]} == {"train"} and {s["split"] for s in by_video["clipB"]} == {"val"}
    a0 = by_video["clipA"][0]["meta"]
    assert a0["boxes"] == [[[1.0, 5.0, 11.0, 15.0]], [[2.0, 5.0, 12.0, 15.0]], [], [[4.0, 5.0, 14.0, 15.0]]]
    assert a0["labels"] == [[1], [1], [], [1]] and "track_ids" not in a0
    b1 = by_video["clipB"][1]["meta"]
    assert b1["track_ids"] == [[1, 2]] * 4
    assert b1["labels"] == [[1, 0]] * 4 and b1["difficult"] == [[False, True]] * 4
    assert b1["boxes"][0] == [[5.0, 2.0, 10.0, 7.0], [20.0, 20.0, 26.0, 26.0]]
    for s in got:  # frames are JPEG of the real size
        for j in range(4):
            data = s[f"{j:03d}.jpg"]
            assert data[:3] == b"\xff\xd8\xff"
            assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (H, W, 3)
    decoded = cv2.imdecode(np.frombuffer(by_video["clipB"][0]["001.jpg"], np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(decoded.astype(int) - _frame_image(2)).mean() < 4  # frame 2 really is frame 2
    assert m["frames_covered_twice"] == 2 + 3
    assert m["has_track_ids"] is True
    assert {e["reason"] for e in m["converted"]} == {reasons.IMAGE_CONVERTED}  # the PNG frames


def test_ir_video_splits_without_splits_file_are_whole_and_deterministic(tmp_path):
    make_ir_video(tmp_path / "irv")
    assert ir_video_run(tmp_path, "ir.video.val_fraction=0.5") == 0
    split_of = {}
    for s in samples(tmp_path, "ir"):
        assert split_of.setdefault(s["meta"]["video"], s["split"]) == s["split"]
    assert split_of == seq.split_videos(["clipA", "clipB"], 0.5)
    assert sorted(split_of.values()) == ["train", "val"]


BOTH = {"clipA", "clipB"}

# (mutation, file, reason, videos still converted, a defect that --strict stops at)
IR_VIDEO_BAD = {
    "box list with a missing line": (
        lambda r: (r / "annotations" / "clipA.txt").write_text("1 1 5 5\n" * 9),
        "clipA.txt", reasons.BOX_LIST_LENGTH, {"clipB"}, True,
    ),
    "box list with an extra line": (
        lambda r: (r / "annotations" / "clipA.txt").write_text("1 1 5 5\n" * 11),
        "clipA.txt", reasons.BOX_LIST_LENGTH, {"clipB"}, True,
    ),
    "malformed box list": (
        lambda r: (r / "annotations" / "clipA.txt").write_text("1 1 5\n" * 10),
        "clipA.txt", ann.MALFORMED_BOX_LIST, {"clipB"}, True,
    ),
    "unreadable video": (
        lambda r: (r / "videos" / "clipA.avi").write_bytes(b"RIFF garbage" * 50),
        "clipA.avi", reasons.UNREADABLE_VIDEO, {"clipB"}, True,
    ),
    "annotation without video": (
        lambda r: (r / "videos" / "clipA.avi").unlink(),
        "clipA.txt", reasons.ANNOTATION_WITHOUT_VIDEO, {"clipB"}, True,
    ),
    "video without annotation": (
        lambda r: (r / "annotations" / "clipA.txt").unlink(),
        "clipA.avi", reasons.VIDEO_WITHOUT_ANNOTATION, {"clipB"}, True,
    ),
    "corrupt frame in a folder": (
        lambda r: (r / "frames" / "clipB" / "000005.png").write_bytes(b"\x89PNG broken"),
        "000005.png", reasons.CORRUPT_IMAGE, BOTH, True,  # clipB keeps its frames 1-4 and 6-9
    ),
    "gt.txt beyond the video": (
        lambda r: (r / "annotations" / "clipB" / "gt.txt").write_text("12,1,1,1,4,4,1,1,1\n"),
        "gt.txt", reasons.MOT_FRAMES, {"clipA"}, True,
    ),
    # A frame dump numbered from 0 beside MOT's gt.txt numbered from 1, the last frame without
    # boxes: every box landed one frame early, silently.
    "frames numbered from 0, gt.txt from 1": (
        lambda r: _renumber_from_zero(r / "frames" / "clipB", r / "annotations" / "clipB" / "gt.txt"),
        "gt.txt", reasons.MOT_FRAMES, {"clipA"}, True,
    ),
    "unknown MOT class id": (
        lambda r: (r / "annotations" / "clipB" / "gt.txt").write_text("1,1,1,1,4,4,1,7,1\n"),
        "gt.txt", reasons.UNKNOWN_CLASS, BOTH, True,
    ),
    "video shorter than clip_length": (
        lambda r: _write_avi(r / "videos" / "clipA.avi", 3) or (r / "annotations" / "clipA.txt").write_text("\n" * 3),
        "clipA.avi", reasons.SHORT_VIDEO, {"clipB"}, False,
    ),
    "blank line after the last frame of a box list": (
        lambda r: (r / "annotations" / "clipA.txt").write_text((r / "annotations" / "clipA.txt").read_text() + "\n"),
        "clipA.txt", reasons.BOX_LIST_TAIL, BOTH, False,
    ),
    "byte-order mark in a box list and the splits file": (
        lambda r: [(r / f).write_bytes(b"\xef\xbb\xbf" + (r / f).read_bytes())
                   for f in ("annotations/clipA.txt", "splits.json")],
        None, None, BOTH, False,
    ),
    "MOT class id not a whole number": (
        lambda r: (r / "annotations" / "clipB" / "gt.txt").write_text("1,1,1,1,4,4,1,1.7,1\n"),
        "gt.txt", ann.MALFORMED_MOT, {"clipA"}, True,
    ),
    "MOT track id not a whole number": (
        lambda r: (r / "annotations" / "clipB" / "gt.txt").write_text("1,2.5,1,1,4,4,1,1,1\n"),
        "gt.txt", ann.MALFORMED_MOT, {"clipA"}, True,
    ),
    "video in two split lists": (
        lambda r: (r / "splits.json").write_text('{"train": ["clipA", "clipB"], "val": ["clipB"]}'),
        "splits.json", reasons.VIDEO_IN_TWO_SPLITS, BOTH, True,
    ),
}


@pytest.mark.parametrize("kind", list(IR_VIDEO_BAD))
def test_ir_video_bad_input(tmp_path, capsys, kind):
    mutate, file, reason, videos, defect = IR_VIDEO_BAD[kind]
    make_ir_video(tmp_path / "irv", {"train": ["clipA"], "val": ["clipB"]})
    mutate(tmp_path / "irv")
    assert ir_video_run(tmp_path) == 0
    m = manifest(tmp_path, "ir")
    if reason is None:
        assert m["skipped"] == [] and m["fixed"] == []
    else:
        assert (file, reason) in entries(m, "skipped") | entries(m, "fixed")
    got = samples(tmp_path, "ir")
    assert {s["meta"]["video"] for s in got} == videos
    if kind == "corrupt frame in a folder":
        assert [s["meta"]["frames"] for s in got if s["meta"]["video"] == "clipB"] == [[1, 2, 3, 4], [6, 7, 8, 9]]
    if kind == "video in two split lists":
        assert {s["split"] for s in got} == {"train"}
    capsys.readouterr()
    rc = ir_video_run(tmp_path, strict=True)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if defect:
        assert rc == 2
        (line,) = [x for x in err.splitlines() if x.startswith("error:")]
        assert file in line and reason in line
    else:
        assert rc == 0


# ---------------------------------------------------------------------------
# Determinism, interruption, subprocess


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_byte_identical_across_runs_and_worker_counts(tmp_path):
    make_voc(tmp_path / "voc", BASE_ITEMS, BASE_SPLITS)
    videos = {"walk": list(range(1, 12))}
    make_ir_frames(tmp_path / "irf", videos, {"train": _ids("walk", videos["walk"]), "val": []})
    common = (f"voc.root={tmp_path / 'voc'}", f"ir.root={tmp_path / 'irf'}", "ir.clip_length=4",
              "voc.shard_size=2", "ir.shard_size=2")
    assert run_stage(tmp_path, *common, workers=1, out="one") == 0
    assert run_stage(tmp_path, *common, workers=2, out="two") == 0
    for name in ("voc", "ir"):
        one, two = _tree(tmp_path / "one" / name), _tree(tmp_path / "two" / name)
        assert sorted(one) == sorted(two) and len([n for n in one if n.endswith(".tar")]) >= 2
        for n in one:
            if n.endswith(".tar"):
                assert one[n] == two[n], n
    assert json.loads(one["manifest.json"])["splits"] == json.loads(two["manifest.json"])["splits"]


_KILLER = """
import os, signal, sys
import ssd.data.shards as shards
original = shards.ShardWriter.write
count = 0
def write(self, key, members):
    global count
    count += 1
    if count == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup handler runs
    return original(self, key, members)
shards.ShardWriter.write = write
from pipeline.prepare import main
sys.exit(main(sys.argv[1:]))
"""


def _run_cli(tmp_path: Path, args: list[str], kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if kill_at is None:
        cmd = [sys.executable, "-m", "pipeline.prepare", *args]
    else:
        cmd = [sys.executable, "-c", _KILLER.format(kill_at=kill_at), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_killed_run_leaves_no_complete_looking_shard_and_rerun_is_clean(tmp_path, monkeypatch):
    items = {f"img{i:02d}": [("cat", (1, 1, 5 + i, 5 + i))] for i in range(9)}
    make_voc(tmp_path / "voc", items, {"train": list(items), "val": []})
    (tmp_path / "params.yaml").write_text("prepare: {}\n")
    args = ["--set", "voc.root=voc", "--set", "voc.shard_size=2", "--set", "ir.enabled=false",
            "--set", "voc.out=data/voc", "--set", "ir.out=data/ir", "--set", "workers=1",
            "--set", "allow_empty_splits=true"]
    out = tmp_path / "data" / "voc"

    def looks_complete(root: Path) -> list[Path]:
        """Shard-named files anywhere outside a temporary directory, and any manifest."""
        found = [p for p in root.rglob("*") if p.is_file() and SHARD_NAME.match(p.name)]
        outside_tmp = [p for p in found if not any(part.startswith(".tmp-") for part in p.relative_to(root).parts)]
        return outside_tmp + list(root.rglob("manifest.json"))

    # Killed while writing the 4th sample: shard 0 complete, shard 1 half-written.
    killed = _run_cli(tmp_path, args, kill_at=4)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    assert looks_complete(tmp_path / "data") == []
    partial = [p for p in (tmp_path / "data").rglob("*") if p.is_file() and ".tar." in p.name]
    assert partial and all(p.name.startswith(".tmp-") for p in partial)

    # A rerun (in-process, to save a start-up) finishes, removes the leftovers, and gives what a clean run gives.
    monkeypatch.chdir(tmp_path)
    assert main(["--params", "params.yaml", *args]) == 0
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".tmp-")] == []
    first = _tree(out)
    assert sum(n.endswith(".tar") for n in first) == 5
    assert Counter(s["__key__"] for s in iter_samples(out)) == Counter(list(items))

    # Killed while rebuilding over a complete output: the old output stays whole.
    killed = _run_cli(tmp_path, args, kill_at=7)
    assert killed.returncode == -signal.SIGKILL
    assert _tree(out) == first
    assert main(["--params", "params.yaml", *args]) == 0
    assert _tree(out) == first  # byte-identical, manifest included


_SLOW_POOL = """
import sys, time
from pathlib import Path
import pipeline.prepare as prepare
from ssd.data.sources import decode
original = decode.load_image
def load_image(path, *args, **kw):
    Path(sys.argv[1]).touch()  # a pool worker is converting
    time.sleep(0.1)
    return original(path, *args, **kw)
decode.load_image = load_image
sys.exit(prepare.main(sys.argv[2:]))
"""


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_pool_of_workers_at_once_and_keeps_the_previous_output(tmp_path, monkeypatch):
    """Ctrl-C signals the whole foreground process group, pool workers included; it used to
    leave the main process waiting forever on a lock a dead worker held (2 runs in 3)."""
    items = {f"img{i:02d}": [("cat", (1, 1, 5 + i % 20, 5 + i % 20))] for i in range(60)}
    make_voc(tmp_path / "voc", items, {"train": list(items), "val": []})
    (tmp_path / "params.yaml").write_text("prepare: {}\n")
    args = ["--set", "voc.root=voc", "--set", "ir.enabled=false", "--set", "voc.out=data/voc",
            "--set", "ir.out=data/ir", "--set", "allow_empty_splits=true"]
    monkeypatch.chdir(tmp_path)
    assert main(["--params", "params.yaml", "--set", "workers=1", *args]) == 0
    before = _tree(tmp_path / "data" / "voc")
    for trial in range(3):
        marker = tmp_path / f"working-{trial}"
        proc = subprocess.Popen(
            [sys.executable, "-c", _SLOW_POOL, str(marker), "--set", "workers=2", *args], cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE, text=True, start_new_session=True,
            # As in a terminal: a suite started in the background (`nohup ... &`) hands its children
            # SIGINT ignored, and Python then never raises KeyboardInterrupt.
            preexec_fn=_sigint_default,
        )
        try:
            deadline = time.monotonic() + 60
            while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert marker.exists(), proc.stderr.read()[-2000:] if proc.poll() is not None else "no worker started"
            time.sleep(0.3)
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err = proc.stderr.read()
        assert proc.returncode == 130, err[-2000:]
        assert "Traceback" not in err and "interrupted (Ctrl-C)" in err
        assert _tree(tmp_path / "data" / "voc") == before
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ir", "voc"]  # nothing temporary left


def test_cli_strict_one_line_error(tmp_path):
    make_voc(tmp_path / "voc", BASE_ITEMS, BASE_SPLITS)
    (tmp_path / "voc" / "Annotations" / "c.xml").write_text("<annotation>")
    (tmp_path / "params.yaml").write_text(
        "prepare:\n  voc:\n    root: voc\n    out: o/voc\n  ir:\n    enabled: false\n    out: o/ir\n"
    )
    proc = _run_cli(tmp_path, ["--strict"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: voc/Annotations/c\.xml: malformed XML: .* \(--strict stops at the first bad input\)",
                        last)


def test_shards_decode_with_the_loader(tmp_path):
    """The loader reads what prepare writes (frames and clips)."""
    loader = pytest.importorskip("ssd.data.loader")
    transforms = pytest.importorskip("ssd.data.transforms")
    make_voc(tmp_path / "voc", BASE_ITEMS, BASE_SPLITS)
    make_ir_video(tmp_path / "irv", {"train": ["clipA", "clipB"]})
    assert run_stage(tmp_path, f"voc.root={tmp_path / 'voc'}", "ir.source=video", f"ir.root={tmp_path / 'irv'}",
                     "ir.clip_length=4", "ir.video.mot_classes=[target, bird]") == 0
    t = transforms.eval_transform(32)
    urls = [str(p) for p in sorted((tmp_path / "out" / "voc").glob("*.tar"))]
    frames = [loader.decode_sample(r, "frames", t) for r in loader.read_raw_samples(urls, "frames")]
    assert len(frames) == 4 and frames[0].image.shape == (3, 32, 32)
    urls = [str(p) for p in sorted((tmp_path / "out" / "ir").glob("*.tar"))]
    clips = [loader.decode_sample(r, "clips", t) for r in loader.read_raw_samples(urls, "clips")]
    assert len(clips) == 6 and clips[0].image.shape == (4, 3, 32, 32) and clips[0].video == "clipA"


# ---------------------------------------------------------------------------
# Real datasets (../shared/data), skipped where absent


def _voc_truth(ann_dir: Path) -> tuple[dict[str, int], list[str]]:
    """Independent count: usable boxes per id, and the files of degenerate (inverted/zero-area) boxes."""
    boxes, degenerate = {}, []
    for p in sorted(ann_dir.glob("*.xml")):
        n = 0
        for obj in ET.parse(p).getroot().iter("object"):
            x1, y1, x2, y2 = (float(obj.find(f"bndbox/{t}").text) for t in ("xmin", "ymin", "xmax", "ymax"))
            if x2 > x1 and y2 > y1:
                n += 1
            else:
                degenerate.append(p.name)
        boxes[p.stem] = n
    return boxes, degenerate


def _split_ids(directory: Path, splits) -> dict[str, list[str]]:
    return {s: (directory / f"{s}.txt").read_text().split() for s in splits}


@pytest.mark.skipif(not (SHARED / "voc-bccd").is_dir(), reason="../shared/data/voc-bccd not present")
def test_real_voc_bccd(tmp_path):
    root = SHARED / "voc-bccd"
    splits = _split_ids(root / "ImageSets" / "Main", ("train", "val", "test"))
    assert run_stage(tmp_path, f"voc.root={root}", "voc.splits=[train, val, test]", "ir.enabled=false", workers=2) == 0
    m = manifest(tmp_path)
    got = samples(tmp_path)
    truth, degenerate = _voc_truth(root / "Annotations")
    assert Counter(s["meta"]["id"] for s in got) == Counter(list(truth))  # every annotation exactly once
    for split, ids in splits.items():
        assert {s["meta"]["id"] for s in got if s["split"] == split} == set(ids)
        assert m["splits"][split]["samples"] == len(ids)
    assert {s["meta"]["id"]: len(s["meta"]["boxes"]) for s in got} == truth
    assert m["classes"] == ["Platelets", "RBC", "WBC"]
    assert sorted(Path(e["file"]).name for e in m["skipped"]) == sorted(degenerate)
    assert set(m["skipped_counts"]) <= {ann.ZERO_AREA_BOX, ann.INVERTED_BOX} and len(degenerate) > 0
    one = got[0]
    assert one["jpg"] == (root / "JPEGImages" / f"{one['meta']['id']}.jpg").read_bytes()


@pytest.mark.skipif(not (SHARED / "ir-sirst").is_dir(), reason="../shared/data/ir-sirst not present")
def test_real_ir_sirst_as_frames(tmp_path):
    root = SHARED / "ir-sirst"
    splits = _split_ids(root / "idx_427", ("train", "val", "test"))
    rc = run_stage(
        tmp_path, f"voc.root={root}", "voc.annotations_dir=masks", "voc.images_dir=images", "voc.splits_dir=idx_427",
        "voc.splits=[train, val, test]", "ir.enabled=false", workers=2,
    )
    assert rc == 0
    m = manifest(tmp_path)
    got = samples(tmp_path)
    truth, degenerate = _voc_truth(root / "masks")
    assert Counter(s["meta"]["id"] for s in got) == Counter(list(truth))
    for split, ids in splits.items():
        assert {s["meta"]["id"] for s in got if s["split"] == split} == set(ids)
    assert {s["meta"]["id"]: len(s["meta"]["boxes"]) for s in got} == truth
    # Independent look at the PNG headers: every image not 8-bit RGB is converted, and
    # every XML size that disagrees with the PNG's is reported.
    not_rgb, wrong_size = set(), set()
    for p in (root / "images").glob("*.png"):
        head = p.read_bytes()[:26]
        if (head[24], head[25]) != (8, 2):
            not_rgb.add(p.name)
        width, height = struct.unpack(">II", head[16:24])
        xml = ET.parse(root / "masks" / f"{p.stem}.xml").getroot()
        if (int(xml.findtext("size/width")), int(xml.findtext("size/height"))) != (width, height):
            wrong_size.add(f"{p.stem}.xml")
    assert {Path(e["file"]).name for e in m["converted"]} == not_rgb and len(not_rgb) > 0
    assert entries(m, "fixed") == {(n, reasons.SIZE_MISMATCH) for n in wrong_size} and wrong_size
    assert sorted(Path(e["file"]).name for e in m["skipped"]) == sorted(degenerate)
    for s in got:
        png = s["png"]
        assert (png[24], png[25]) == (8, 2)
        assert struct.unpack(">II", png[16:24]) == (s["meta"]["width"], s["meta"]["height"])
        for x1, y1, x2, y2 in s["meta"]["boxes"]:
            assert 0 <= x1 < x2 <= s["meta"]["width"] and 0 <= y1 < y2 <= s["meta"]["height"]


def test_params_section_and_dvc_stage_agree():
    """params.yaml's section parses, and dvc.yaml lists exactly the keys the stage reads."""
    import yaml

    from pipeline.config import flatten, load_config, load_params, to_dict

    params = load_params(REPO / "params.yaml")
    cfg = load_config(stage.PrepareConfig, params, "prepare")
    assert cfg.voc.out == "data/shards/voc" and cfg.ir.out == "data/shards/ir"
    maps = {"prepare.ir.video.pairs"}  # free-form mappings: tracked as one key, whatever they hold
    read = {f"prepare.{k}" for k in flatten(to_dict(cfg))} | maps
    dvc_stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]
    assert set(dvc_stage["params"]) == read
    assert set(flatten(params["prepare"], "prepare.")) | maps == read  # every key spelled out in params.yaml
    assert params["prepare"]["ir"]["video"]["pairs"] == {}
    assert dvc_stage["outs"] == ["${prepare.voc.out}", "${prepare.ir.out}"]
    assert {"${prepare.voc.root}", "${prepare.ir.root}", "pipeline/prepare.py"} <= set(dvc_stage["deps"])


def test_nothing_converted_is_exit_2_naming_what_was_found_on_each_side(tmp_path):
    """Videos and box lists that don't pair: nothing to convert, said in one line, previous output kept."""
    root = tmp_path / "irv"
    make_ir_video(root, {"train": ["clipA"], "val": ["clipB"]})
    assert ir_video_run(tmp_path) == 0
    before = manifest(tmp_path, "ir")
    (root / "annotations" / "clipA.txt").rename(root / "annotations" / "new_clipA_0.txt")
    shutil.move(root / "annotations" / "clipB", root / "annotations" / "other")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", "--params", str(tmp_path / "params.yaml"), "--set", "workers=1",
         "--set", "voc.enabled=false", "--set", "ir.source=video", "--set", f"ir.root={root}",
         "--set", f"ir.out={tmp_path / 'out' / 'ir'}", "--set", f"voc.out={tmp_path / 'out' / 'voc'}"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {root}: no ir sample was written; skipped: ")
    assert "2 video without annotation (videos/clipA.avi, frames/clipB)" in line
    assert "2 annotation without video (annotations/new_clipA_0.txt, annotations/other/gt.txt)" in line
    assert "Traceback" not in result.stderr
    assert manifest(tmp_path, "ir") == before  # the previous output is untouched


def test_an_empty_configured_split_is_exit_2_unless_allowed(tmp_path):
    make_voc(tmp_path / "voc", BASE_ITEMS, {"train": list(BASE_ITEMS), "val": ["missing"]})
    assert voc_run(tmp_path, allow_empty=False) == 2
    assert not (tmp_path / "out" / "voc").exists()
    assert voc_run(tmp_path, allow_empty=True) == 0
    assert manifest(tmp_path)["splits"]["val"]["samples"] == 0


def test_one_video_without_a_split_file_leaves_val_empty_and_says_so(tmp_path, capsys):
    root = tmp_path / "irv"
    make_ir_video(root)
    shutil.rmtree(root / "frames")  # only clipA.avi: the hash puts the one video in one split
    shutil.rmtree(root / "annotations" / "clipB")
    assert ir_video_run(tmp_path, allow_empty=False) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: {root}: ir split 'val' would be empty (samples: train 3, val 0);" in err
    assert "prepare.allow_empty_splits: true" in err

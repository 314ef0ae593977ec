"""The benchmark stage, run as users run it (a subprocess on tiny model files and shards), and its parts.

Only the structure of the figures is checked: no timing is asserted anywhere.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import cv2
import pytest
import torch
import yaml

from pipeline import benchmark
from pipeline.bench import chain as bench_chain
from pipeline.bench import models as bench_models
from pipeline.bench import peer as bench_peer
from shardgen import CLASSES, write_clip_dataset, write_frame_dataset
from test_prepare import BASE_ITEMS, BASE_SPLITS, make_voc
from ssd.model_file import save_model_file
from ssd.models import lstm_ssd_mobilenet_v2, ssdlite_mobilenet_v2
from ssd.pruning import PruneConfig, prune_model

ROOT = Path(__file__).resolve().parents[1]
FILES = ["models/tiny.pt", "models/tiny-pruned.pt", "models/tiny_lstm.pt"]

BENCHMARK = {
    "threads": 0,  # the in-process tests must not change this process's threads
    "device": "cpu",
    "models": {"files": FILES, "batch": 2, "repeats": 2, "throughput_repeats": 1, "warmup": 1, "source_size": [96, 72]},
    "postprocess": {"batch": 1, "repeat": 1},
    "loader": {"shards": "shards", "image_size": 64, "batch_size": 2, "num_workers": 0, "num_batches": 1},
    "train_step": {"model": "models/tiny.pt", "shards": "shards", "batch_size": 2, "num_workers": 0, "steps": 1, "warmup": 0},
    "convert": {"voc_dir": "voc", "videos": 2, "frames": 6, "size": [48, 36]},
    "feed": {"source_size": [96, 72], "image_size": 64, "samples": 3, "repeats": 1, "gpu_rates": {"a_gpu": 600}},
}


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("ACCELERATE_CONFIG_FILE", None)
    return e


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.benchmark", *args], cwd=cwd, env=env(), capture_output=True, text=True,
        timeout=240, check=False,
    )  # fmt: skip


def tiny_ssdlite(image_size: int = 64):
    return ssdlite_mobilenet_v2(len(CLASSES) + 1, width_mult=0.25, image_size=image_size).eval()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    write_frame_dataset(root / "shards", {"train": [6], "val": [2]})
    make_voc(root / "voc", BASE_ITEMS, BASE_SPLITS)
    torch.manual_seed(0)
    model = tiny_ssdlite()
    save_model_file(root / "models" / "tiny.pt", model, CLASSES)
    lstm = lstm_ssd_mobilenet_v2(len(CLASSES) + 1, width_mult=0.25, image_size=64).eval()
    save_model_file(root / "models" / "tiny_lstm.pt", lstm, CLASSES)
    prune_model(model, PruneConfig(ratio=0.5))
    save_model_file(root / "models" / "tiny-pruned.pt", model, CLASSES)
    (root / "params.yaml").write_text(yaml.safe_dump({"benchmark": BENCHMARK}))
    return root


def merged(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and key in out else value
    return out


@pytest.fixture(scope="module")
def written(project) -> tuple[dict, dict]:
    """(metrics/benchmark.json, reports/benchmark-setup.json) of one run."""
    result = run(project)
    assert result.returncode == 0, result.stderr[-4000:]
    return (json.loads((project / "metrics" / "benchmark.json").read_text()),
            json.loads((project / "reports" / "benchmark-setup.json").read_text()))


@pytest.fixture(scope="module")
def figures(written) -> dict:
    """Both files merged back into one result (key order: the metrics first)."""
    return merged(*written)


def strings_and_numbers(tree: dict, path: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        out += strings_and_numbers(value, f"{path}.{key}") if isinstance(value, dict) else [(f"{path}.{key}", value)]
    return out


def test_the_metrics_file_holds_measurements_and_the_setup_file_how_they_were_made(written):
    metrics, setup = written
    leaves = strings_and_numbers(metrics)
    assert not [p for p, v in leaves if isinstance(v, str)]
    assert not [p for p, v in leaves if p.rsplit(".", 1)[-1] in benchmark.SETUP_NUMBERS]
    assert {".models.tiny.latency_ms.total", ".peer_ratio", ".models.tiny.throughput.images_per_s"} <= dict(leaves).keys()
    assert setup["device"].startswith("cpu") and setup["threads"] >= 1 and setup["torch"] == torch.__version__
    assert setup["postprocess"]["device"] == "cpu"  # timed on the CPU whatever benchmark.device says
    assert setup["models"]["tiny"] == {"file": "models/tiny.pt", "arch": "ssdlite_mobilenet_v2", "mode": "frame",
                                       "pruned": "no", "image_size": 64, "width_mult": 0.25,
                                       "num_classes": len(CLASSES) + 1, "num_priors": setup["models"]["tiny"]["num_priors"],
                                       "throughput": {"batch": 2}}


def test_every_model_has_its_latency_parts_and_costs(figures):
    assert figures["device"].startswith("cpu") and figures["threads"] >= 1
    assert list(figures["models"]) == ["tiny", "tiny-pruned", "tiny_lstm"]
    for name, fig in figures["models"].items():
        ms = fig["latency_ms"]
        assert set(ms) == {"pre", "forward", "post", "total"}
        assert all(ms[k] > 0 for k in ("pre", "forward", "post"))
        assert ms["total"] == pytest.approx(ms["pre"] + ms["forward"] + ms["post"], abs=2e-3)
        assert sum(fig["share"].values()) == pytest.approx(1.0, abs=1e-3)
        assert figures["postprocess_share"][name] == fig["share"]["post"]
        assert fig["post_eval_config_ms"] > 0  # the evaluation's post-processing, timed beside
        assert fig["params"] > 0 and fig["macs"] > 0
        assert fig["throughput"]["batch"] == 2 and fig["throughput"]["images_per_s"] > 0
        assert set(fig["throughput"]["ms_per_batch"]) == {"pre", "forward", "post", "total"}
    models = figures["models"]
    assert models["tiny_lstm"]["mode"] == "streaming" and models["tiny"]["mode"] == "frame"
    assert models["tiny-pruned"]["pruned"] == "yes" and models["tiny-pruned"]["macs"] < models["tiny"]["macs"]


def test_peer_and_lstm_comparisons_are_present(figures):
    peer = figures["peer"]
    assert peer["compared_with"] == "tiny" and peer["image_size"] == 64 and peer["num_classes"] == len(CLASSES) + 1
    assert sum(peer["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert math.isfinite(figures["peer_ratio"]) and figures["peer_ratio"] > 0 and peer["forward_ratio"] > 0
    assert peer["ours_ms"] > 0 and peer["macs"] > 0
    lstm = figures["lstm_vs_ssdlite"]["tiny_lstm"]
    assert lstm["reference"] == "tiny" and lstm["random_reference"] == "no"  # same arch: the listed model
    assert figures["lstm_vs_ssdlite_latency_ratio"] == lstm["forward_ratio"] > 0


def test_other_sections_are_collected(figures):
    assert set(figures["postprocess"]["flat"]) >= {"ours_ms", "torchvision_ms", "speedup"}
    assert figures["loader"]["shard_over_bare"] > 0
    assert figures["train_step"]["model"] == "tiny" and math.isfinite(figures["train_step"]["overhead"])
    convert = figures["convert"]
    assert convert["frames_images"] == sum(len(ids) for ids in BASE_SPLITS.values())  # every listed image converted
    assert convert["frames_per_s_per_worker"] > 0 and convert["video_frames_per_s_per_worker"] > 0
    assert convert["video_peak_rss_mb_many"] > 0 and convert["rss_ratio"] > 0 and convert["videos_many"] == 2
    feed = figures["feed"]
    full, late, none = (feed[f"images_per_s_per_worker{s}"] for s in ("", "_photometric_after_resize", "_no_photometric"))
    assert full > 0 and late > 0 and none > 0
    assert feed["workers_needed"] == {"a_gpu": math.ceil(600 / full)}
    assert feed["source_size"] == "96x72" and feed["gpu_rates"] == "a_gpu 600 images/s"  # setup, not metrics


def test_headline_figures_come_first(figures):
    keys = list(figures)
    assert keys.index("postprocess_share") < keys.index("models")
    assert keys.index("peer_ratio") < keys.index("models") and keys.index("lstm_vs_ssdlite_latency_ratio") < keys.index("models")


def test_chart_is_a_png(project, figures):
    path = project / "reports" / "benchmark.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "models.files=[models/tiny.pt, models/gone.pt]"], "models/gone.pt: model file not found"),
        (["--only", "models,speed"], "unknown benchmark section 'speed'"),
        (["--only", "postprocess", "--set", "setup=models"], "models: is a folder; name the file to write"),
        (["--set", "models.repeats=0"], "benchmark.models.repeats: must be at least 1"),
        (["--set", "models.source_image=gone.jpg"], "gone.jpg: image not found"),
        (["--set", "train_step.model=models/gone.pt", "--only", "train_step"], "models/gone.pt: model file not found"),
        # Settings that were tracebacks (exit 1) after the timing had begun.
        (["--only", "postprocess", "--set", "postprocess.repeat=0"], "benchmark.postprocess.repeat: must be at least 1"),
        (["--only", "postprocess", "--set", "postprocess.num_classes=1"], "benchmark.postprocess.num_classes: the back"),
        (["--only", "loader", "--set", "loader.num_workers=-1"], "benchmark.loader.num_workers: must not be negative"),
        (["--only", "loader", "--set", "loader.voc_dir=nowhere"], "nowhere: no VOC-layout dataset"),
        # A typo in a pair dropped its ratios from the JSON without a word.
        (["--only", "deployed", "--set", "deployed.files=[models/tiny.pt, models/tiny-pruned.pt]",
          "--set", "deployed.pruned=[tiny, tiny_pruned]"], "benchmark.deployed.pruned: 'tiny_pruned' is not the stem"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(project, monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.chdir(project)
    out = tmp_path / "never.json"
    assert benchmark.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_bad_sample_read_by_a_loader_worker_ends_the_loader_section(project, tmp_path):
    """Its one line and exit 2, the loader's workers (which ignore SIGTERM) stopped: a process
    waiting for them at its exit would hang, and the test's timeout would fail it."""
    import io
    import shutil
    import tarfile

    shards = tmp_path / "shards"
    shutil.copytree(project / "shards", shards)
    for tar_path in shards.glob("train-*.tar"):
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(tar_path, "w") as tar:
            for info, data in members:
                data = b"\xff\xd8\xff" + bytes(200) if info.name.endswith(".jpg") else data
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    result = run(project, "--only", "loader", "--set", f"loader.shards={shards}", "--set", "loader.num_workers=2",
                 "--out", str(tmp_path / "x.json"))  # run()'s timeout: a hang fails the test
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot decode the image" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x.json").exists()


def test_the_loose_file_comparison_needs_the_shards_own_images(project, monkeypatch, capsys, tmp_path):
    """It read the first files of another VOC folder instead, and reported a ratio of two workloads."""
    monkeypatch.chdir(project)
    out = tmp_path / "never.json"
    assert benchmark.main(["--only", "loader", "--set", "loader.voc_dir=voc", "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: voc: 2 of the 2 shard images read have no JPEGImages/<id>.jpg with "
                           "Annotations/<id>.xml (first: train_00000)"), last
    assert not out.exists()


def test_out_moves_the_setup_file_and_chart_too(project, written, tmp_path):
    """`--out FILE` wrote the metrics there but replaced the stage's own setup file (a DVC out,
    describing metrics/benchmark.json) with the partial run's."""
    before = (project / "reports" / "benchmark-setup.json").read_bytes()
    out = tmp_path / "pp.json"
    result = run(project, "--only", "postprocess", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (project / "reports" / "benchmark-setup.json").read_bytes() == before
    assert set(json.loads(out.read_text())) >= {"postprocess"}
    assert json.loads((tmp_path / "pp-setup.json").read_text())["device"].startswith("cpu")


def test_models_section_decodes_a_given_image(project, tmp_path):
    image = tmp_path / "frame.jpg"
    image.write_bytes(bench_chain.synthetic_jpeg(80, 60, seed=1))
    result = bench_models.run([str(project / "models" / "tiny.pt")], batch=2, repeats=1, throughput_repeats=1,
                              warmup=0, source_image=str(image), peer=False)  # fmt: skip
    assert result["source_size"] == "80x60" and list(result["models"]) == ["tiny"]
    assert "peer_ratio" not in result and "lstm_vs_ssdlite_latency_ratio" not in result


def test_time_steps_chains_the_steps_and_counts_only_the_repeats():
    calls = []

    def first(value):
        calls.append("first")
        return 1

    def second(value):
        calls.append("second")
        return value + 1

    seconds, last = bench_chain.time_steps([("a", first), ("b", second)], repeats=3, warmup=2, device=torch.device("cpu"))
    assert list(seconds) == ["a", "b"] and all(s >= 0 for s in seconds.values())
    assert last == 2 and calls == ["first", "second"] * 5


def test_lstm_without_a_listed_ssdlite_of_its_arch_gets_a_random_one():
    torch.manual_seed(0)
    lstm = lstm_ssd_mobilenet_v2(3, width_mult=0.25, image_size=64, placement=("backbone",), state_reduction=2).eval()
    other = tiny_ssdlite(image_size=96)
    name, reference, random = bench_models._reference(lstm, {"lstm": lstm, "other": other})
    assert random and "random" in name
    assert reference.arch == bench_models.ssdlite_arch(lstm.arch) and reference.image_size == 64
    assert "placement" not in reference.arch and reference.arch["name"] == "ssdlite_mobilenet_v2"
    with torch.no_grad():  # the reference runs on the same input and predicts for the same priors
        assert reference(torch.rand(1, 3, 64, 64))[0].shape == lstm(torch.rand(1, 3, 64, 64))[0].shape


def test_an_lstm_on_mobilenet_v3_is_compared_with_the_ssdlite_on_mobilenet_v3():
    """The reference was always ssdlite_mobilenet_v2: a V3 LSTM-SSD's reduced_tail made it a traceback."""
    from ssd.models import lstm_ssd_mobilenet_v3_large

    torch.manual_seed(0)
    lstm = lstm_ssd_mobilenet_v3_large(3, width_mult=0.5, image_size=64).eval()
    name, reference, random = bench_models._reference(lstm, {"lstm": lstm})
    assert random and name.startswith("random ssdlite_mobilenet_v3_large")
    assert reference.arch == bench_models.ssdlite_arch(lstm.arch) and reference.arch["name"] == "ssdlite_mobilenet_v3_large"
    with torch.no_grad():
        assert reference(torch.rand(1, 3, 64, 64))[0].shape == lstm(torch.rand(1, 3, 64, 64))[0].shape


def test_peer_steps_are_its_own_forward():
    torch.manual_seed(0)
    peer = bench_peer.build_peer(num_classes=3, image_size=64)
    jpeg = bench_chain.synthetic_jpeg(96, 72)
    _, split = bench_chain.time_steps(
        bench_peer.peer_steps(peer, jpeg, 1, torch.device("cpu")), repeats=1, warmup=0, device=torch.device("cpu")
    )
    image = torch.from_numpy(bench_chain.decode_rgb(jpeg)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        whole = peer([image])
        features = list(peer.backbone(peer.transform([image])[0].tensors).values())
    assert features[0].shape[-1] == 4  # 64 px / 16: the peer really runs at our size, not at 320
    assert len(split) == len(whole) == 1
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(split[0][key], whole[0][key])


@pytest.fixture(scope="module")
def deployed_figures(project) -> dict:
    """The deployed section on the deploy stage's graphs of the three tiny models, 1 and 2 threads."""
    write_clip_dataset(project / "clips", {"train": [4], "val": [2]}, clip_length=4, size=48)
    deploy = {"models": [{"file": f, "shards": "clips" if "lstm" in f else "shards"} for f in FILES],
              "int8": {"frames": 4, "run_length": 2}}  # an LSTM-SSD calibrates on clips
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump({**params, "deploy": deploy}))
    result = subprocess.run([sys.executable, "-m", "pipeline.deploy"], cwd=project, env=env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    settings = ["--set", "deployed.files=[models/tiny.pt, models/tiny-pruned.pt, models/tiny_lstm.pt]",
                "--set", "deployed.pruned=[tiny, tiny-pruned]", "--set", "deployed.lstm=[tiny_lstm, tiny]",
                "--set", "deployed.repeats=2", "--set", "deployed.throughput_repeats=1", "--set", "deployed.warmup=1",
                "--set", "deployed.batch=2", "--set", "deployed.camera_rounds=2", "--set", "deployed.camera_block=2"]
    result = run(project, "--only", "deployed", "--out", "deployed.json", *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((project / "deployed.json").read_text())["deployed"]


def test_deployed_section_times_every_runtime_and_reports_the_ratios(deployed_figures):
    d = deployed_figures
    assert set(d["pruned_speedup"]) == {"eager", "eager_folded", "ort_fp32", "ort_int8"}
    assert d["pruned_speedup_fastest"] in d["pruned_speedup"].values()
    assert d["int8_vs_eager"] > 0 and d["int8_vs_eager_end_to_end"] > 0
    assert set(d["lstm_vs_ssdlite"]) == {"ort_fp32", "ort_int8"}
    # post_share: the int8 graph with the post-processing inside (the deploy stage wrote it by default)
    assert set(d["post_share"]) == set(d["post_share_python"]) == {"tiny", "tiny-pruned", "tiny_lstm"}
    assert set(d["post_share_interleaved"]) == set(d["post_share"])
    for stem, share in d["post_share"].items():
        loop = d["threads_1"]["camera_loop"][stem]
        graph, python = loop["graph_ms"], loop["python_ms"]
        post = max(graph["forward"] - python["forward"], 0) + graph["post"]
        assert loop["graph_post_ms"] == pytest.approx(post, abs=2e-3)
        assert share == pytest.approx(post / graph["total"], abs=1e-3) and 0 < share < 1
        assert d["post_share_python"][stem] == pytest.approx(python["post"] / python["total"], abs=1e-3)
    for threads in ("threads_1", "threads_2"):
        for name, runtimes in d[threads]["models"].items():
            assert set(runtimes) == {"eager", "eager_folded", "ort_fp32", "ort_int8", "ort_int8_detect"}
            for fig in runtimes.values():
                ms = fig["latency_ms"]
                assert all(ms[k] > 0 for k in ("pre", "forward", "post"))
                assert ms["total"] == pytest.approx(ms["pre"] + ms["forward"] + ms["post"], abs=2e-3)
                assert 0 < fig["post_share"] < 1 and fig["images_per_s"] > 0
        assert d[threads]["lstm_vs_ssdlite"]["ort_int8"]["ratio"] > 0


def test_deployed_section_times_the_models_section_s_frame(project, deployed_figures):
    """With no source_image it timed a 640x480 frame whatever models.source_size said."""
    setup = json.loads((project / "deployed-setup.json").read_text())["deployed"]
    assert setup["source_size"] == "96x72"  # BENCHMARK's models.source_size


def test_a_detector_graph_with_other_thresholds_is_refused(project, deployed_figures, tmp_path):
    """The camera loop timed the graph at the deploy stage's thresholds and the Python path at the
    benchmark's: with deploy.detect.score_threshold changed, two different workloads, exit 0."""
    result = run(project, "--only", "deployed", "--out", str(tmp_path / "x.json"), "--set",
                 "deployed.files=[models/tiny.pt]", "--set", "models.postprocess.score_threshold=0.5")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: models/deploy/tiny-int8-detect.onnx: score_threshold 0.3 in the graph, 0.5 here"), last
    assert "Traceback" not in result.stderr and not (tmp_path / "x.json").exists()


def test_deployed_section_restores_the_threads_it_set(project, deployed_figures, monkeypatch):
    """It put torch's thread count back but left OpenCV's at its last setting for the next section."""
    from pipeline.bench import deployed as bench_deployed

    monkeypatch.chdir(project)
    threads = (torch.get_num_threads(), cv2.getNumThreads())
    other = 1 if threads[1] != 1 else 2
    bench_deployed.run(["models/tiny.pt"], threads=(other,), batch=1, repeats=1, throughput_repeats=1, warmup=0,
                       camera_rounds=1, camera_block=1)
    assert (torch.get_num_threads(), cv2.getNumThreads()) == threads


def test_graphs_exported_from_another_model_are_refused(project, deployed_figures, tmp_path):
    """A model retrained with another setting beside its old graphs: the benchmark timed the new
    file against the old model's graphs and reported their ratios, exit 0."""
    (tmp_path / "models").mkdir()
    save_model_file(tmp_path / "models" / "tiny.pt", tiny_ssdlite(image_size=96), CLASSES)
    result = run(project, "--only", "deployed", "--out", str(tmp_path / "x.json"), "--set",
                 f"deployed.files=[{tmp_path / 'models' / 'tiny.pt'}]")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: models/deploy/tiny.onnx: exported from another model than "), last
    assert "image_size 64 in the graph, 96 in the file" in last and "run the deploy stage again" in last
    assert not (tmp_path / "x.json").exists()


def test_an_lstm_pair_of_different_models_is_refused_before_timing(project, deployed_figures, tmp_path):
    """An LSTM-SSD of another input size than its SSDLite was a traceback after all the timing."""
    result = run(project, "--only", "deployed", "--out", str(tmp_path / "x.json"), "--set",
                 "deployed.files=[models/tiny.pt, models/tiny-pruned.pt, models/tiny_lstm.pt]", "--set",
                 "deployed.pruned=[tiny, tiny-pruned]", "--set", "deployed.lstm=[tiny_lstm, tiny-pruned]")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: benchmark.deployed.lstm: models/tiny-pruned.pt is not the SSDLite "
                           "models/tiny_lstm.pt is built on ("), last
    assert "Traceback" not in result.stderr and not (tmp_path / "x.json").exists()


def test_a_train_step_model_of_other_classes_than_the_shards_is_refused(project, monkeypatch, capsys, tmp_path):
    """It was an IndexError from the loss (a label past the model's classes), exit 1."""
    monkeypatch.chdir(project)
    save_model_file(tmp_path / "two.pt", ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=64), ["a", "b"])
    assert benchmark.main(["--only", "train_step", "--set", f"train_step.model={tmp_path / 'two.pt'}",
                           "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: shards: classes {CLASSES} are not those of "), err
    assert not (tmp_path / "x.json").exists()


def test_deployed_section_without_graphs_is_one_line(project, tmp_path):
    result = run(project, "--only", "deployed", "--out", str(tmp_path / "x.json"), "--set",
                 f"deployed.onnx_dir={tmp_path}", "--set", "deployed.files=[models/tiny.pt]")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'tiny.onnx'}: float graph not found")
    assert "Traceback" not in result.stderr and not (tmp_path / "x.json").exists()


def test_feed_samples_are_frames_the_training_transform_reads():
    from pipeline.bench.feed import voc_like_samples
    from ssd.data.loader import decode_sample
    from ssd.data.transforms import AugmentConfig, train_transform

    samples = voc_like_samples(4, (120, 90))
    for raw in samples:
        meta = json.loads(raw.meta)
        assert (meta["width"], meta["height"]) == (120, 90) and 1 <= len(meta["boxes"]) <= 6
        assert all(0 <= x1 < x2 <= 120 and 0 <= y1 < y2 <= 90 for x1, y1, x2, y2 in meta["boxes"])
        sample = decode_sample(raw, "frames", train_transform(64, AugmentConfig()))
        assert sample.image.shape == (3, 64, 64) and sample.size == (120, 90)
    assert len({raw.images[0] for raw in samples}) == 4  # four different pictures


@pytest.mark.parametrize("kind", ["depthwise", "pointwise"])
def test_kernel_graphs_compute_the_same_convolution_in_float_and_int8(kind):
    import onnxruntime as ort
    from pipeline.bench.kernels import conv_graph

    # Inputs below 0.5 (uint8 up to 128): AVX2 without VNNI adds uint8 x int8 products in pairs into
    # int16, which saturates with inputs near 255 and weights near 127 (why ONNX Runtime's quantizer
    # has reduce_range); this test is about the graphs, not that.
    x = np.random.default_rng(1).random((1, 16, 12, 12), dtype=np.float32) * 0.5
    outs = []
    for int8 in (False, True):
        session = ort.InferenceSession(conv_graph(kind, 16, 12, 2, int8), providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {"x": x})[0])
    assert outs[0].shape == outs[1].shape == (1, 16, 6, 6)
    # The int8 graph's output step is 0.05 (and its range [-6.4, 6.35]): it rounds, nothing more.
    assert np.abs(outs[0]).max() > 0.1 and np.abs(outs[0] - outs[1]).max() < 0.04


def test_kernels_section_times_each_width_in_both_formats(tmp_path):
    from pipeline.bench import kernels

    result = kernels.run(kinds=["depthwise", "pointwise"], widths=[8, 16], size=8, strides=[1, 2], repeats=2, warmup=1)
    for kind in ("depthwise", "pointwise"):
        assert set(result[kind]) == {"stride_1", "stride_2"}
        for row in result[kind].values():
            assert set(row) == {"8", "16"}
            assert all(r["int8_us"] > 0 and r["float_us"] > 0 for r in row.values())
        assert set(result["slower_than_wider"][kind]) == {"stride_1", "stride_2"}
    assert isinstance(result["cpu"], str) and isinstance(result["onnxruntime"], str)  # for the setup file


def test_slower_than_wider_names_the_widths_a_wider_one_beats():
    from pipeline.bench.kernels import slower_than_wider

    assert slower_than_wider({8: 132.0, 16: 110.0, 24: 205.0, 32: 165.0, 48: 386.0}) == [8, 24]
    assert slower_than_wider({8: 1.0, 16: 2.0, 32: 3.0}) == []


def test_kernels_section_is_not_in_the_cpu_run_and_refuses_a_bad_kind(project, monkeypatch, capsys, tmp_path):
    from pipeline.bench.config import BenchmarkConfig

    assert "kernels" not in BenchmarkConfig().sections
    monkeypatch.chdir(project)
    out = tmp_path / "never.json"
    assert benchmark.main(["--only", "kernels", "--set", "kernels.kinds=[grouped]", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "benchmark.kernels: unknown kind 'grouped'" in err[0], err
    assert not out.exists()

import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from ssd.boxes import box_iou
from ssd.clip_loss import clip_loss
from ssd.loss import MultiBoxLoss
from ssd.model_file import load_model_file, save_model_file
from ssd.models import build_model, lstm_ssd_mobilenet_v2, ssdlite_mobilenet_v2
from ssd.models.lstm_ssd import LSTMSSD, load_matching_weights, set_backbone_trainable
from ssd.postprocess import PostProcessor

S = 64
PLACEMENTS = [(("backbone",), 1), (("extras",), 2), (("backbone", "extras"), 4)]


def tiny(placement=("backbone",), state_reduction=1, num_classes=3, seed=0):
    torch.manual_seed(seed)
    return lstm_ssd_mobilenet_v2(
        num_classes, width_mult=0.25, image_size=S, placement=placement, state_reduction=state_reduction
    )


def randomise_batch_norm(model):
    # Non-trivial running statistics, so eval-mode comparisons exercise them.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def assert_streaming_equals_clip(model, clips, tol):
    """Frame by frame with the state fed back equals ``forward_clip`` on ``clips [B, T, 3, S, S]``;
    returns the clip's ``(logits, deltas, final state)``."""
    with torch.no_grad():
        logits, deltas, final = model.forward_clip(clips)
        state = None
        for t in range(clips.shape[1]):
            frame_logits, frame_deltas, state = model(clips[:, t], state)
            assert_close(frame_logits, logits[:, t], atol=tol, rtol=tol)
            assert_close(frame_deltas, deltas[:, t], atol=tol, rtol=tol)
    assert_close(state, final, atol=tol, rtol=tol)
    return logits, deltas, final


@pytest.mark.parametrize("placement, reduction", PLACEMENTS)
def test_streaming_frame_by_frame_equals_the_unrolled_clip(placement, reduction):
    model = randomise_batch_norm(tiny(placement, reduction)).eval()
    clips = torch.rand(2, 4, 3, S, S)
    logits, _, final = assert_streaming_equals_clip(model, clips, tol=1e-5)
    with torch.no_grad():
        # A clip continued from a carried state: the same as one long clip.
        _, _, half = model.forward_clip(clips[:, :2])
        rest_logits, _, rest_state = model.forward_clip(clips[:, 2:], half)
    assert_close(rest_logits, logits[:, 2:], atol=1e-5, rtol=1e-5)
    assert_close(rest_state, final, atol=1e-5, rtol=1e-5)


def assert_cells_feed_their_maps(model, base, producers):
    """Stub every cell of ``model`` with "double the map" and double the output of the module
    of ``base`` (an SSDLite with the same weights) that makes the same map, ``producers[k]``
    for the cell on map ``k``: the predictions agree only if each cell's output feeds both
    the head and every layer after it."""
    for k, cell in model.temporal.items():
        cell.forward = lambda x, state: (2 * x, state)
        producers[int(k)].register_forward_hook(lambda module, args, out: 2 * out)
    images = torch.rand(2, 3, S, S)
    with torch.no_grad():
        logits, deltas, _ = model(images)
        base_logits, base_deltas = base(images)
    assert_close(logits, base_logits)
    assert_close(deltas, base_deltas)


def test_stride8_cell_feeds_every_later_map():
    # As test_each_cells_output_replaces_its_map, for a cell on the stride-8 map (block 6):
    # a "double the map" cell and the same doubling hooked on block 6 of SSDLite agree
    # only if every later block, extra layer and head reads the cell's output.
    priors = {"min_sizes": [6, 12, 20, 30, 40, 50, 60], "aspect_ratios": [[2]] * 7}
    kwargs = dict(width_mult=0.25, image_size=S, taps=(6, 13, 17), priors=priors)
    torch.manual_seed(0)
    model = lstm_ssd_mobilenet_v2(3, placement=("stride8",), residual=True, **kwargs)
    model = randomise_batch_norm(model).eval()
    assert model.cell_maps == [0]
    base = ssdlite_mobilenet_v2(3, **kwargs).eval()
    load_matching_weights(base, model.state_dict())
    assert_cells_feed_their_maps(model, base, {0: base.backbone.features[6]})
    with pytest.raises(ValueError, match="stride8"):
        lstm_ssd_mobilenet_v2(3, width_mult=0.25, image_size=S, placement=("stride8",))  # no tap 6


def test_the_state_changes_the_prediction():
    model = randomise_batch_norm(tiny()).eval()
    frames = torch.rand(2, 3, S, S)
    with torch.no_grad():
        fresh, _, _ = model(frames[1:])
        _, _, state = model(frames[:1])
        carried, _, _ = model(frames[1:], state)
    assert not torch.allclose(fresh, carried)


def test_reset_zeroes_the_state_of_the_marked_samples_only():
    model = randomise_batch_norm(tiny(("backbone", "extras"), 2)).eval()
    clips = torch.rand(2, 3, 3, S, S)
    with torch.no_grad():
        _, _, state = model.forward_clip(clips[:, :2])
        kept_logits, kept_deltas, kept_state = model(clips[:, 2], state)
        logits, deltas, new_state = model(clips[:, 2], state, reset=torch.tensor([False, True]))
        fresh_logits, fresh_deltas, fresh_state = model(clips[1:, 2])  # sample 1 starting a new video
    assert_close(logits[1:], fresh_logits, atol=1e-5, rtol=1e-5)
    assert_close(deltas[1:], fresh_deltas, atol=1e-5, rtol=1e-5)
    assert_close(tuple(s[1:] for s in new_state), fresh_state, atol=1e-5, rtol=1e-5)
    assert_close(logits[:1], kept_logits[:1])
    assert_close(deltas[:1], kept_deltas[:1])
    assert_close(tuple(s[:1] for s in new_state), tuple(s[:1] for s in kept_state))
    assert not torch.allclose(logits[1:], kept_logits[1:])


@pytest.mark.parametrize("placement, reduction", PLACEMENTS)
def test_last_frames_loss_reaches_the_first_frame(placement, reduction):
    # Eval mode: batch norm must not be the path between frames, only the recurrence.
    model = tiny(placement, reduction).eval()
    clips = torch.rand(2, 3, 3, S, S, requires_grad=True)
    logits, deltas, _ = model.forward_clip(clips)
    (logits[:, -1].sum() + deltas[:, -1].sum()).backward()
    first = clips.grad[:, 0]
    assert torch.isfinite(clips.grad).all()
    assert first.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.temporal.parameters())


def test_no_gradient_between_frames_without_the_recurrence():
    # The control for the test above: cut the state between frames and the first frame gets nothing.
    model = tiny().eval()
    clips = torch.rand(1, 2, 3, S, S, requires_grad=True)
    _, _, state = model.forward_clip(clips[:, :1])
    logits, _, _ = model.forward_clip(clips[:, 1:], tuple(s.detach() for s in state))
    logits.sum().backward()
    assert clips.grad[:, 0].abs().sum() == 0


def test_state_follows_the_input_dtype_and_device():
    model = tiny(("backbone", "extras"), 2)
    state = model.init_state(2)
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in state)
    assert [tuple(s.shape) for s in state[:2]] == [(2, 12, 4, 4)] * 2  # 24 channels // 2 on the stride-16 map
    model = model.double().eval()
    logits, deltas, state = model(torch.rand(2, 3, S, S, dtype=torch.float64))
    assert logits.dtype == deltas.dtype == torch.float64
    assert all(s.dtype == torch.float64 for s in state)
    assert all(s.dtype == torch.float16 for s in model.init_state(1, dtype=torch.float16))


def test_forget_gate_bias_is_one_in_every_cell():
    model = tiny(("backbone", "extras"), 1)
    assert len(model.temporal) == 5  # stride 16 + 4 extras
    for cell in model.temporal.values():
        n = cell.hidden_channels
        assert_close(cell.gates[1].bias.detach()[n : 2 * n], torch.ones(n))


@pytest.mark.parametrize("placement, reduction", PLACEMENTS)
def test_same_detector_as_ssdlite_and_its_weights_load(placement, reduction):
    model = tiny(placement, reduction).eval()
    torch.manual_seed(1)
    base = ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=S).eval()
    assert_close(model.priors, base.priors)
    images = torch.rand(2, 3, S, S)
    logits, deltas, _ = model(images)
    base_logits, base_deltas = base(images)
    assert logits.shape == base_logits.shape and deltas.shape == base_deltas.shape

    loaded, skipped = load_matching_weights(model, base.state_dict())
    assert skipped == ["priors"]
    assert loaded == [k for k in base.state_dict() if k != "priors"]
    own = model.state_dict()
    for key in loaded:
        assert_close(own[key], base.state_dict()[key])
    assert any(k.startswith("temporal.") for k in own)  # the cells keep their own weights


@pytest.mark.parametrize("placement, reduction", PLACEMENTS)
def test_residual_lstm_ssd_started_from_ssdlite_predicts_what_it_predicts(placement, reduction):
    torch.manual_seed(0)
    model = lstm_ssd_mobilenet_v2(
        3, width_mult=0.25, image_size=S, placement=placement, state_reduction=reduction, residual=True
    )
    assert model.arch["residual"] is True
    base = randomise_batch_norm(ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=S)).eval()
    load_matching_weights(model, base.state_dict())
    model.eval()
    clips = torch.rand(2, 3, 3, S, S)
    with torch.no_grad():
        logits, deltas, state = model(clips)
        base_logits, base_deltas = base(clips.flatten(0, 1))
    assert_close(logits.flatten(0, 1), base_logits)
    assert_close(deltas.flatten(0, 1), base_deltas)
    assert any(s.abs().sum() > 0 for s in state)
    rebuilt = build_model(model.arch)
    assert all(cell.residual for cell in rebuilt.temporal.values())


def test_load_matching_weights_skips_shape_mismatches():
    model = tiny()
    other = ssdlite_mobilenet_v2(5, width_mult=0.25, image_size=S).state_dict()  # 5 classes: other head
    loaded, skipped = load_matching_weights(model, other)
    assert any(k.startswith("head.cls_layers") for k in skipped)
    assert any(k.startswith("head.box_layers") for k in loaded)
    assert any(k.startswith("backbone.") for k in loaded)


@pytest.mark.parametrize("placement, reduction", PLACEMENTS)
def test_each_cells_output_replaces_its_map(placement, reduction):
    # Stub every cell with "double the map" and double the same maps in SSDLite with
    # hooks: the outputs agree only if each cell's output feeds both the head and
    # the layers after it.
    model = randomise_batch_norm(tiny(placement, reduction)).eval()
    base = ssdlite_mobilenet_v2(3, width_mult=0.25, image_size=S).eval()
    load_matching_weights(base, model.state_dict())
    producers = [base.backbone.features[13], base.backbone.features[17], *base.extras]
    assert_cells_feed_their_maps(model, base, {int(k): producers[int(k)] for k in model.temporal})


def test_set_backbone_trainable():
    model = tiny()
    set_backbone_trainable(model, False)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    logits, deltas, _ = model.forward_clip(torch.rand(2, 2, 3, S, S))
    (logits.sum() + deltas.sum()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    for part in (model.temporal, model.extras, model.head):
        assert all(p.requires_grad and p.grad is not None for p in part.parameters())
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


def test_builder_validates_its_arguments():
    with pytest.raises(ValueError, match="placement"):
        tiny(("head",))
    with pytest.raises(ValueError, match="placement"):
        tiny(())
    with pytest.raises(ValueError, match="state_reduction"):
        tiny(state_reduction=0)
    model = tiny()
    with pytest.raises(ValueError, match="state has"):
        model(torch.rand(1, 3, S, S), state=())
    with pytest.raises(NotImplementedError):
        model.features(torch.rand(1, 3, S, S))


def test_arch_is_plain_data_and_rebuilds_the_same_model():
    model = tiny(("backbone", "extras"), 2).eval()
    assert model.arch["name"] == "lstm_ssd_mobilenet_v2" and model.is_temporal
    assert model.arch["placement"] == ["backbone", "extras"] and model.arch["state_reduction"] == 2
    again = build_model(model.arch).eval()
    assert isinstance(again, LSTMSSD)
    again.load_state_dict(model.state_dict())
    x = torch.rand(1, 2, 3, S, S)
    with torch.no_grad():
        assert_close(again.forward_clip(x), model.forward_clip(x))


def test_model_file_round_trip_in_a_fresh_process(tmp_path):
    model = randomise_batch_norm(tiny(("backbone", "extras"), 2)).eval()
    path, inputs, outputs = tmp_path / "m.pt", tmp_path / "x.pt", tmp_path / "y.pt"
    save_model_file(path, model, ["a", "b"], meta={"kind": "lstm"})
    frames = torch.rand(3, 1, 3, S, S)
    torch.save(frames, inputs)
    code = (
        "import sys, torch\n"
        "from ssd.model_file import load_model_file\n"
        "model, info = load_model_file(sys.argv[1])\n"
        "state, out = None, []\n"
        "with torch.no_grad():\n"
        "    for frame in torch.load(sys.argv[2]):\n"
        "        logits, deltas, state = model(frame, state)\n"
        "        out.append((logits, deltas))\n"
        "torch.save({'out': out, 'state': state, 'name': info['arch']['name']}, sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(inputs), str(outputs)], check=True)
    result = torch.load(outputs)
    assert result["name"] == "lstm_ssd_mobilenet_v2"
    state = None
    with torch.no_grad():
        for frame, (logits, deltas) in zip(frames, result["out"]):
            expected_logits, expected_deltas, state = model(frame, state)
            assert_close(logits, expected_logits)
            assert_close(deltas, expected_deltas)
    assert_close(result["state"], state)
    loaded, info = load_model_file(path)
    assert isinstance(loaded, LSTMSSD) and info["meta"] == {"kind": "lstm"}


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.onnx")
def test_streaming_step_exports_to_onnx_with_the_state_as_plain_inputs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = randomise_batch_norm(tiny(("backbone", "extras"), 2)).eval()

    class Step(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images, *state):
            logits, deltas, new_state = self.model(images, state)
            return (logits, deltas, *new_state)

    state = model.init_state(1)
    names = [f"state_{i}" for i in range(len(state))]
    path = tmp_path / "step.onnx"
    frames = torch.rand(2, 1, 3, S, S)
    torch.onnx.export(  # the TorchScript exporter: torch.export's needs onnxscript
        Step(model).eval(),
        (frames[0], *state),
        str(path),
        dynamo=False,
        input_names=["images", *names],
        output_names=["logits", "deltas", *[f"new_{n}" for n in names]],
    )
    session = ort.InferenceSession(str(path))
    ort_state = [s.numpy() for s in state]
    with torch.no_grad():
        for frame in frames:
            out = session.run(None, {"images": frame.numpy(), **dict(zip(names, ort_state))})
            logits, deltas, state = model(frame, state)
            ort_state = out[2:]
            assert_close(torch.from_numpy(out[0]), logits, atol=1e-4, rtol=1e-4)
            assert_close(torch.from_numpy(out[1]), deltas, atol=1e-4, rtol=1e-4)
    assert_close(tuple(torch.from_numpy(s) for s in ort_state), state, atol=1e-4, rtol=1e-4)


# --- clip_loss ---------------------------------------------------------------------------------


def frame_target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4), "labels": torch.tensor(labels)}


def clip_targets():
    # 2 clips x 3 frames; every frame has an object so each frame's own loss is defined.
    boxes = [[0.1, 0.1, 0.5, 0.5], [0.4, 0.4, 0.9, 0.9], [0.0, 0.5, 0.5, 1.0]]
    return [
        [frame_target([boxes[t]], [1]) for t in range(3)],
        [frame_target([boxes[t], boxes[(t + 1) % 3]], [1, 2]) for t in range(3)],
    ]


def test_clip_loss_counts_every_frame_normalised_by_all_positives():
    model = tiny()
    criterion = MultiBoxLoss(model.priors)
    g = torch.Generator().manual_seed(0)
    p = model.priors.shape[0]
    logits = torch.randn(2, 3, p, 3, generator=g, requires_grad=True)
    deltas = torch.randn(2, 3, p, 4, generator=g, requires_grad=True)
    targets = clip_targets()
    out = clip_loss(criterion, logits, deltas, targets)
    # Each frame's own loss times its positives is its unnormalised sum; the clip loss is
    # the sum over all frames divided by the positives of all frames.
    total, positives = 0.0, 0.0
    for b in range(2):
        for t in range(3):
            frame = criterion(logits[b, t : t + 1], deltas[b, t : t + 1], [targets[b][t]])
            n = frame["num_positives"]
            assert n > 0
            total, positives = total + frame["loss"] * n, positives + n
    assert_close(out["num_positives"], positives)
    assert_close(out["loss"], total / positives)
    out["loss"].backward()
    assert (logits.grad.flatten(2).abs().sum(-1) > 0).all()  # every one of the 6 frames gets gradient


def test_clip_loss_rejects_targets_of_the_wrong_shape():
    model = tiny()
    criterion = MultiBoxLoss(model.priors)
    p = model.priors.shape[0]
    logits, deltas = torch.zeros(2, 3, p, 3), torch.zeros(2, 3, p, 4)
    with pytest.raises(ValueError, match="2 clips of 3 frames"):
        clip_loss(criterion, logits, deltas, clip_targets()[:1])
    with pytest.raises(ValueError, match="2 clips of 3 frames"):
        clip_loss(criterion, logits, deltas, [c[:2] for c in clip_targets()])


# --- learning -------------------------------------------------------------------------------------


def occlusion_clips():
    """Two 3-frame clips, an object in a different corner of each, blanked in the middle frame.

    The blanked frames are identical in both clips while the annotated boxes don't
    overlap: a per-frame detector gives both the same prediction and can't be right for
    both; only a memory of the first frame tells them apart.
    """
    clips = torch.full((2, 3, 3, S, S), 0.5)
    corners = [(6, 30), (34, 58)]
    targets = []
    for b, (lo, hi) in enumerate(corners):
        clips[b, :, 0, lo:hi, lo:hi] = 1.0  # a red square
        clips[b, :, 1:, lo:hi, lo:hi] = 0.0
        targets.append([frame_target([[lo / S, lo / S, hi / S, hi / S]], [1]) for _ in range(3)])
    clips[:, 1] = 0.5
    return clips, targets


def train_on_clips(model, clips, targets, steps, per_frame):
    criterion = MultiBoxLoss(model.priors)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b, t = clips.shape[:2]

    def predict():
        if per_frame:
            return tuple(o.unflatten(0, (b, t)) for o in model(clips.flatten(0, 1)))
        return model.forward_clip(clips)[:2]

    for _ in range(steps):
        loss = clip_loss(criterion, *predict(), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Scored in train mode (batch statistics of the same B*T frames, as in training): 40 steps
    # are too few for the running statistics. Both blanked frames get the same statistics,
    # so this gives the per-frame detector no way to tell them apart.
    with torch.no_grad():
        logits, deltas = predict()
    blank = criterion(logits[:, 1], deltas[:, 1], [clip[1] for clip in targets])["loss"].item()
    return blank, logits[:, 1], deltas[:, 1]


@pytest.fixture
def one_thread():
    # Tiny convolutions: on a shared 2-core machine a second thread can make this 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lstm_ssd_remembers_an_object_through_a_blank_frame(one_thread):
    clips, targets = occlusion_clips()
    torch.manual_seed(0)
    ssdlite = ssdlite_mobilenet_v2(2, width_mult=0.25, image_size=S)
    ssdlite_blank, ssdlite_logits, _ = train_on_clips(ssdlite, clips, targets, 40, per_frame=True)
    assert_close(ssdlite_logits[0], ssdlite_logits[1])  # same input, same answer

    model = tiny(num_classes=2, seed=0)
    blank, logits, deltas = train_on_clips(model, clips, targets, 40, per_frame=False)
    assert blank < 0.5 * ssdlite_blank, (blank, ssdlite_blank)
    detections = PostProcessor(model.priors)(logits, deltas)
    for det, clip in zip(detections, targets):
        assert box_iou(clip[1]["boxes"], det["boxes"][:1]).item() > 0.5, det["boxes"][:3]


def test_lstm_ssd_sits_on_mobilenet_v3_as_on_v2():
    """The converted torchvision SSDLite320 (MobileNetV3-Large) is a base for LSTM-SSD too: the cell on the
    stride-16 map (C4's expansion), residual, so that it starts by predicting what its SSDLite predicts."""
    size = 128
    torch.manual_seed(0)
    base = randomise_batch_norm(build_model({"name": "ssdlite_mobilenet_v3_large", "num_classes": 3,
                                             "image_size": size, "width_mult": 0.5})).eval()
    model = build_model({**base.arch, "name": "lstm_ssd_mobilenet_v3_large", "placement": ["backbone"],
                         "state_reduction": 4, "residual": True})
    assert model.cell_maps == [0] and model.temporal["0"].in_channels == base.backbone.features[0][-1].out_channels
    assert model.input_norm == base.input_norm
    load_matching_weights(model, base.state_dict())
    model.eval()
    clips = torch.rand(2, 3, 3, size, size)
    with torch.no_grad():
        logits, deltas, state = model(clips)
        base_logits, base_deltas = base(clips.flatten(0, 1))
    assert_close(logits.flatten(0, 1), base_logits)
    assert_close(deltas.flatten(0, 1), base_deltas)
    with pytest.raises(ValueError, match="placement 'stride8' is not available on this backbone"):
        build_model({**base.arch, "name": "lstm_ssd_mobilenet_v3_large", "placement": ["stride8"]})

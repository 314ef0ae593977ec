import pytest
import torch
from torch.testing import assert_close

from ssd.models import lstm_ssd_mobilenet_v2
from ssd.state_carry import StateCarry, clip_keys

S = 64


def tiny():
    torch.manual_seed(0)
    model = lstm_ssd_mobilenet_v2(3, width_mult=0.25, image_size=S, placement=("backbone",)).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial batch-norm statistics, so the outputs are not all ~0
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def test_carried_clips_continue_the_video_as_one_long_clip():
    model = tiny()
    video = torch.rand(2, 6, 3, S, S)
    carry = StateCarry(keep=2)
    with torch.no_grad():
        whole, _, _ = model.forward_clip(video)
        # First halves: videos "a" (frames 1-3) and "b" (frames 11-13).
        starts, nexts = clip_keys(["a", "b"], [[1, 2, 3], [11, 12, 13]])
        state, carried = carry.take(model.init_state(2), starts)
        assert carried == 0
        _, _, end = model.forward_clip(video[:, :3], state)
        carry.put(end, nexts)
        # Second halves, in the other order, plus a clip of "a" that does not follow on.
        zero = model.init_state(3)
        starts, _ = clip_keys(["b", "a", "a"], [[14, 15, 16], [4, 5, 6], [20, 21, 22]])
        state, carried = carry.take(zero, starts)
        assert carried == 2 and len(carry) == 0
        assert all(z.abs().sum() == 0 for z in zero)  # the zero state is not written to
        clips = torch.stack([video[1, 3:], video[0, 3:], video[0, 3:]])
        logits, _, _ = model.forward_clip(clips, state)
        fresh, _, _ = model.forward_clip(video[:1, 3:])
    assert_close(logits[0], whole[1, 3:], atol=1e-5, rtol=1e-5)
    assert_close(logits[1], whole[0, 3:], atol=1e-5, rtol=1e-5)
    assert_close(logits[2], fresh[0], atol=1e-5, rtol=1e-5)  # no state waited for frame 20
    assert not torch.allclose(logits[1], fresh[0])  # the carried state mattered


def test_states_pass_within_a_run_only():
    # Two runs of video "a" at the same frames (two batch positions): each keeps its own state.
    carry = StateCarry(keep=2)
    _, nexts = clip_keys(["a", "a"], [[1, 2], [1, 2]], runs=[7, 9])
    carry.put((torch.tensor([[1.0], [2.0]]),), nexts)
    starts, _ = clip_keys(["a", "a", "a"], [[3, 4], [3, 4], [3, 4]], runs=[9, 7, 8])
    state, carried = carry.take((torch.zeros(3, 1),), starts)
    assert carried == 2 and state[0].flatten().tolist() == [2.0, 1.0, 0.0]


def test_states_are_detached_and_dropped_when_not_taken():
    carry = StateCarry(keep=2)
    h = torch.ones(2, 3, requires_grad=True) * 2
    carry.put((h,), clip_keys(["a", "b"], [[1], [1]])[1])
    state, _ = carry.take((torch.zeros(1, 3),), clip_keys(["a"], [[2]])[0])
    assert not state[0].requires_grad and state[0].sum() == 6
    carry.put((torch.zeros(1, 3),), clip_keys(["c"], [[1]])[1])
    assert len(carry) == 2  # b (waiting for frame 2) and c
    carry.put((torch.zeros(1, 3),), clip_keys(["d"], [[1]])[1])
    assert len(carry) == 2  # b is two puts old: dropped
    with pytest.raises(ValueError, match="keep"):
        StateCarry(keep=0)

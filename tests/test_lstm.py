import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from ssd.lstm import BottleneckConvLSTMCell


def reference_step(cell, x, h, c):
    """The paper's equations (arXiv 1711.06368, eq. 4-8) written out with the cell's weights."""

    def separable(seq, inp):
        dw, pw = seq
        inp = F.conv2d(inp, dw.weight, padding=1, groups=inp.shape[1])
        return F.conv2d(inp, pw.weight, pw.bias)

    n = cell.hidden_channels
    b = separable(cell.bottleneck, torch.cat((x, h), 1)).clamp(0, 6)
    z = separable(cell.gates, b)
    i, f, g, o = z[:, :n], z[:, n : 2 * n], z[:, 2 * n : 3 * n], z[:, 3 * n :]
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * g.clamp(0, 6)
    h = torch.sigmoid(o) * c.clamp(0, 6)
    return h, c


def test_step_follows_the_paper_equations():
    torch.manual_seed(0)
    cell = BottleneckConvLSTMCell(5, 3)
    x = torch.randn(2, 5, 6, 7)
    h0, c0 = torch.rand(2, 3, 6, 7), torch.rand(2, 3, 6, 7) * 8
    out, (h, c) = cell(x, (h0, c0))
    ref_h, ref_c = reference_step(cell, x, h0, c0)
    assert_close(h, ref_h)
    assert_close(c, ref_c)
    assert out is h  # no projection when out_channels is not given


def test_hand_computed_step_from_biases_only():
    cell = BottleneckConvLSTMCell(2, 1)
    with torch.no_grad():
        for p in cell.parameters():
            p.zero_()
        cell.gates[1].bias.copy_(torch.tensor([0.0, 1.0, 7.0, 2.0]))  # i, f, g, o
    c0 = torch.full((1, 1, 1, 1), 3.0)
    _, (h, c) = cell(torch.randn(1, 2, 1, 1), (torch.zeros(1, 1, 1, 1), c0))
    # c = sigmoid(1) * 3 + sigmoid(0) * relu6(7) = 2.193 + 3; h = sigmoid(2) * relu6(5.193)
    expected_c = torch.sigmoid(torch.tensor(1.0)) * 3 + 0.5 * 6
    assert_close(c.flatten(), expected_c.view(1))
    assert_close(h.flatten(), (torch.sigmoid(torch.tensor(2.0)) * expected_c).view(1))


def test_forget_gate_bias_is_one_at_init():
    cell = BottleneckConvLSTMCell(8, 4)
    bias = cell.gates[1].bias.detach()
    assert_close(bias[4:8], torch.ones(4))
    assert_close(torch.cat((bias[:4], bias[8:])), torch.zeros(12))


def test_layers_are_depthwise_separable():
    cell = BottleneckConvLSTMCell(16, 8)
    dw, pw = cell.bottleneck
    assert dw.groups == dw.in_channels == 24 and dw.kernel_size == (3, 3)
    assert pw.kernel_size == (1, 1) and pw.out_channels == 8
    dw, pw = cell.gates
    assert dw.groups == dw.in_channels == 8 and pw.out_channels == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fresh_state_on_the_inputs_dtype_and_device(dtype):
    cell = BottleneckConvLSTMCell(4, 6).to(dtype)
    x = torch.randn(3, 4, 5, 5, dtype=dtype)
    out, (h, c) = cell(x)
    assert h.dtype == c.dtype == out.dtype == dtype
    assert h.shape == c.shape == (3, 6, 5, 5) and h.device == x.device
    h0, c0 = cell.init_state(3, 5, 5, x.device, dtype)
    assert_close(cell(x, (h0, c0))[1], (h, c))
    assert not h0.any() and not c0.any()


def test_projection_restores_the_input_width():
    torch.manual_seed(0)
    cell = BottleneckConvLSTMCell(16, 4, out_channels=16)
    out, (h, c) = cell(torch.randn(2, 16, 3, 3))
    assert out.shape == (2, 16, 3, 3) and h.shape == c.shape == (2, 4, 3, 3)
    assert_close(out, cell.project(h))
    assert BottleneckConvLSTMCell(16, 16, out_channels=16).project is None


def test_residual_cell_starts_as_the_identity_and_then_learns_to_add():
    torch.manual_seed(0)
    cell = BottleneckConvLSTMCell(6, 3, out_channels=6, residual=True)
    x = torch.randn(2, 6, 4, 4)
    out, (h, c) = cell(x)
    assert_close(out, x)  # zero-initialised projection: the map passes unchanged
    assert h.abs().sum() > 0  # ... while the state already runs
    out.sum().backward()
    assert cell.project.weight.grad.abs().sum() > 0  # and the projection gets a gradient
    with torch.no_grad():
        cell.project.weight.normal_()
    out, (h, c) = cell(x)
    assert_close(out, x + cell.project(h))
    with pytest.raises(ValueError, match="residual"):
        BottleneckConvLSTMCell(6, 3, out_channels=5, residual=True)


def test_state_is_explicit_nothing_stored_on_the_module():
    torch.manual_seed(0)
    cell = BottleneckConvLSTMCell(4, 4)
    assert list(cell.buffers()) == []
    x = torch.randn(1, 4, 3, 3)
    _, s1 = cell(x)
    _, s2 = cell(x, s1)
    assert_close(cell(x)[1], s1)  # a call without state starts afresh, whatever came before
    assert not torch.equal(s2[1], s1[1])


def test_gradient_reaches_the_first_step_through_the_state():
    torch.manual_seed(0)
    cell = BottleneckConvLSTMCell(3, 4)
    xs = torch.randn(5, 2, 3, 4, 4, requires_grad=True)
    state = None
    for x in xs:
        out, state = cell(x, state)
    out.sum().backward()
    assert xs.grad[0].abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cell.parameters())


def test_outputs_are_bounded_by_relu6():
    torch.manual_seed(0)
    cell = BottleneckConvLSTMCell(3, 4)
    state = None
    for _ in range(4):
        out, state = cell(torch.randn(2, 3, 4, 4) * 100, state)
    assert out.min() >= 0 and out.max() <= 6

"""JumpReLU and step pseudo-derivatives against values computed by hand."""

import pytest
import torch

from gs_lightning.kernels.functional import jumprelu, jumprelu_st, rectangle, step

# threshold t = [0.01, 0.01, 0.25], bandwidth eps = 0.002 so the kernel is 1 where |pre - t| < 0.001.
PRE = torch.tensor([[0.0105, 0.5, 0.2495], [0.0095, 0.0, 0.3]])
T = torch.tensor([0.01, 0.01, 0.25])
EPS = 0.002
G = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
# Near the threshold (kernel = 1): (0,0) and (1,0) in column 0, (0,2) in column 2.
# JumpReLU d/dt = -(t/eps) * sum_b K * g: col0 -5 * (1 + 4) = -25, col1 0, col2 -125 * 3 = -375.
JUMPRELU_GRAD_T = torch.tensor([-25.0, 0.0, -375.0])
# Step d/dt = -(1/eps) * sum_b K * g with g = 1: -500 * [2, 0, 1].
STEP_GRAD_T = torch.tensor([-1000.0, 0.0, -500.0])


def test_rectangle_kernel() -> None:
    u = torch.tensor([-0.6, -0.5, -0.49, 0.0, 0.49, 0.5, 0.6])
    assert rectangle(u).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_jumprelu_forward_and_gradients() -> None:
    pre = PRE.clone().requires_grad_()
    t = T.clone().requires_grad_()
    out = jumprelu(pre, t, EPS)
    torch.testing.assert_close(out, torch.tensor([[0.0105, 0.5, 0.0], [0.0, 0.0, 0.3]]))
    out.backward(G)
    # No straight-through: gradient to pre only where the unit is active.
    torch.testing.assert_close(pre.grad, torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 6.0]]))
    torch.testing.assert_close(t.grad, JUMPRELU_GRAD_T)


def test_step_forward_and_gradients() -> None:
    pre = PRE.clone().requires_grad_()
    t = T.clone().requires_grad_()
    out = step(pre, t, EPS)
    assert out.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    out.sum().backward()
    assert pre.grad is None or torch.all(pre.grad == 0)
    torch.testing.assert_close(t.grad, STEP_GRAD_T)


def test_straight_through_jumprelu_forward_and_gradients() -> None:
    pre = PRE.clone().requires_grad_()
    t = T.clone().requires_grad_()
    out = jumprelu_st(pre, t, EPS)
    torch.testing.assert_close(out, jumprelu(PRE, T, EPS))
    out.backward(G)
    # d/dpre = H * g + (t/eps) K g, with t/eps = 5 (col 0) and 125 (col 2):
    # (0,0) 1 + 5 * 1 = 6, (0,2) 0 + 125 * 3 = 375, (1,0) 0 + 5 * 4 = 20; elsewhere H * g.
    torch.testing.assert_close(pre.grad, torch.tensor([[6.0, 2.0, 375.0], [20.0, 0.0, 6.0]]))
    # The threshold gradient is the plain JumpReLU's.
    torch.testing.assert_close(t.grad, JUMPRELU_GRAD_T)


def test_log_threshold_chain_rule() -> None:
    # d/d(log t) = t * d/dt: col0 0.01 * -25 = -0.25, col2 0.25 * -375 = -93.75 (JumpReLU),
    # and 0.01 * -1000 = -10, 0.25 * -500 = -125 (step).
    log_t = T.log().requires_grad_()
    jumprelu(PRE, log_t.exp(), EPS).backward(G)
    torch.testing.assert_close(log_t.grad, torch.tensor([-0.25, 0.0, -93.75]))
    log_t.grad = None
    step(PRE, log_t.exp(), EPS).sum().backward()
    torch.testing.assert_close(log_t.grad, torch.tensor([-10.0, 0.0, -125.0]))


def test_threshold_gradient_stays_float32_for_bf16_inputs() -> None:
    t = T.clone().requires_grad_()
    pre = PRE.to(torch.bfloat16).requires_grad_()
    jumprelu(pre, t, EPS).float().sum().backward()
    assert t.grad.dtype == torch.float32
    assert pre.grad.dtype == torch.bfloat16
    # bf16 rounds 0.0105 to 0.010498..., still inside the kernel: same count as in fp32.
    assert t.grad[0].item() == pytest.approx(-5.0 * 2, rel=1e-6)

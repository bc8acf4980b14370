"""Optimizer-state memory of torch Adam against bitsandbytes' 8-bit Adam, and their step time.

1. State bytes at the real shape (default d_in=2304, d_sae=16384, a Gemma 2 2B residual
   SAE): each optimizer takes one real ``step()`` on random gradients of a JumpReLU SAE's
   parameters (state does not depend on the gradients' values), then every tensor in its
   state is counted. 8-bit Adam keeps the matrices' moments in uint8 (plus one float32
   scale per 256 values) and the vectors' (threshold, biases) in float32, as
   ``gs_lightning.train.optim`` configures it.
2. Wider dictionaries (``--extrapolate_d_sae``, default 131072: 302M parameters, whose
   fp32 Adam state alone is 2.4 GB) are not allocated: the bytes per matrix element and
   per vector element measured in 1. are multiplied by their parameter counts. The table
   marks those rows ``extrapolated``.
3. Step time on CPU at a small shape: a whole JumpReLU training step (forward, backward,
   optimizer, decoder constraint) with each optimizer, and ``optimizer.step()`` alone.
   On CPU 8-bit Adam is expected to be slower; its value is memory on an accelerator.

Run: ``python benchmarks/optimizer_memory.py [--d_in 2304 --d_sae 16384]``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
from jsonargparse import CLI

from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.optim import build_optimizer, state_bytes

OPTIMIZERS = ("adam", "adam8bit")


def _median_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _optimizer(name: str, sae: JumpReLUSAE) -> torch.optim.Optimizer:
    # The module's settings: Gemma Scope betas, torch's fused kernel for plain Adam.
    return build_optimizer(name, sae.parameters(), lr=7e-5, betas=(0.0, 0.999), eps=1e-8, fused=name == "adam")


def measured_state(name: str, d: int, S: int) -> tuple[int, int, int]:
    """(state bytes, state bytes of the matrices, state bytes of the vectors) after one step."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(d, S, fused=False)
    for p in sae.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = _optimizer(name, sae)
    optimizer.step()
    per_param = {id(p): sum(v.numel() * v.element_size() for v in optimizer.state[p].values()
                            if isinstance(v, torch.Tensor) and v.numel() > 1) for p in sae.parameters()}
    total = sum(state_bytes(optimizer).values())
    matrices = per_param[id(sae.W_enc)] + per_param[id(sae.W_dec)]
    return total, matrices, total - matrices


def step_seconds(name: str, B: int, d: int, S: int, repeats: int) -> tuple[float, float]:
    """Median seconds of a whole training step and of ``optimizer.step()`` alone."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(d, S).train()
    optimizer = _optimizer(name, sae)
    x = torch.randn(B, d) / d**0.5

    def step() -> None:
        out = sae.training_output(x)
        torch.stack(list(out.losses.values())).sum().backward()
        sae.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients' storage for opt_only
        sae.after_optimizer_step()

    whole = _median_seconds(step, 2, repeats)
    for p in sae.parameters():
        p.grad.normal_(0, 1e-3)
    alone = _median_seconds(optimizer.step, 1, repeats)
    return whole, alone


def main(d_in: int = 2304, d_sae: int = 16384, extrapolate_d_sae: list[int] = [131072],  # noqa: B006
         batch: int = 1024, step_d_in: int = 256, step_d_sae: int = 4096, repeats: int = 5) -> None:
    """Print optimizer-state bytes and step times of Adam and 8-bit Adam, and their ratios.

    Args:
        d_in: Activation width of the SAE whose optimizer state is measured.
        d_sae: Latents of that SAE.
        extrapolate_d_sae: Wider dictionaries whose state bytes are computed per parameter
            from the measured shape (not allocated).
        batch: Activations per step in the step-time comparison.
        step_d_in: Activation width in the step-time comparison.
        step_d_sae: Latents in the step-time comparison.
        repeats: Timed steps per optimizer (the median is reported).
    """
    d, S = d_in, d_sae
    print(f"optimizer state of a JumpReLU SAE, torch {torch.__version__}, threads {torch.get_num_threads()}")
    matrix_elems, vector_elems = 2 * d * S, 2 * S + d  # W_enc, W_dec; b_enc, threshold, b_dec
    measured = {name: measured_state(name, d, S) for name in OPTIMIZERS}
    rows = []
    for name in OPTIMIZERS:
        total, _, _ = measured[name]
        rows.append((f"d_in={d} d_sae={S}", name, "measured", total, total / (matrix_elems + vector_elems)))
    for wide in extrapolate_d_sae:
        m_elems, v_elems = 2 * d * wide, 2 * wide + d
        for name in OPTIMIZERS:
            _, matrices, vectors = measured[name]
            # Per element as measured: the 8-bit code tables (2 x 256 floats a matrix) are
            # counted proportionally, which over-counts them by a negligible amount.
            total = round(matrices / matrix_elems * m_elems + vectors / vector_elems * v_elems)
            rows.append((f"d_in={d} d_sae={wide}", name, "extrapolated", total, total / (m_elems + v_elems)))

    print(f"\n{'shape':26s} {'optimizer':10s} {'how':13s} {'state MiB':>10s} {'bytes/param':>12s}")
    for shape, name, how, total, per in rows:
        print(f"{shape:26s} {name:10s} {how:13s} {total / 2**20:10.1f} {per:12.3f}")

    B, sd, sS = batch, step_d_in, step_d_sae
    print(f"\nCPU step time, B={B} d_in={sd} d_sae={sS} (medians of {repeats})")
    times = {name: step_seconds(name, B, sd, sS, repeats) for name in OPTIMIZERS}
    print(f"{'optimizer':10s} {'step ms':>9s} {'opt.step ms':>12s}")
    for name, (whole, alone) in times.items():
        print(f"{name:10s} {whole * 1e3:9.1f} {alone * 1e3:12.1f}")

    ratio = measured["adam8bit"][0] / measured["adam"][0]
    print(f"\n8-bit / fp32 Adam state at d_sae={S}: {ratio:.3f}")
    print(f"8-bit / fp32 Adam whole step on CPU: {times['adam8bit'][0] / times['adam'][0]:.2f}x")
    print(f"result: adam8bit_state_ratio {ratio:.4f}")
    print(f"result: adam8bit_cpu_step_slowdown {times['adam8bit'][0] / times['adam'][0]:.3f}")


if __name__ == "__main__":
    CLI(main, as_positional=False)
    sys.stdout.flush()

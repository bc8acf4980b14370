"""Cross-layer transcoder training-step throughput against the matmul peak.

At one shape (default: B=2048 tokens, L=4 layers, d=256, n=4096 latents per layer, so
16,384 latents in all), measured side by side in one process:

1. the matmul peak on the step's own GEMM shapes: per source layer l, the encoder
   ``[B, d] @ [d, n]``, the decoder to its ``L - l`` target layers ``[B, n] @ [n, (L - l) d]``,
   and the backward GEMMs ``dW_dec``, ``df`` and ``dW_enc`` (the input gradient is not
   needed), each timed alone into a preallocated output;
2. the CLT's training step (forward, backward, Adam, decoder constraint) in fp32, with the
   fused step (:mod:`gs_lightning.kernels.clt_fused`, the default) and through autograd
   (``fused=False``);
3. the same latents as L per-layer JumpReLU transcoders (``n`` latents each, the fused step),
   whose GEMMs are the CLT's with only the ``l -> l`` decoders.

GEMM FLOPs the CLT step executes: ``4 B L d n`` (encoders forward and ``dW_enc``) plus
``6 B P n d`` (decoders forward, ``dW_dec`` and ``df``) with ``P = L (L + 1) / 2`` decoder
pairs; for L = 1 this is the single-site step's ``10 B d n``. Ends with ``result:`` lines:

* ``clt_step_peak_fraction``: fused CLT step GEMM FLOP/s over the peak on its shapes;
* ``transcoders_step_peak_fraction``: the same for the per-layer transcoders;
* ``clt_vs_transcoders_step_seconds``: CLT step time / per-layer transcoders' (the decoder
  pairs make the CLT do ``(4 L + 6 P) / (10 L)`` times the work: 1.9x at L = 4);
* ``clt_fused_vs_autograd``: autograd CLT step time / fused CLT step time.

Run: ``python benchmarks/clt_step.py [--batch 2048 --layers 4 --d 256 --n 4096 --device auto]``.
"""

from __future__ import annotations

import sys

import torch
from jsonargparse import CLI
from step import _time, bare_step_seconds

from callbacks.throughput import device_name
from gs_lightning.console import quiet_third_party
from gs_lightning.saes.clt import CrossLayerTranscoder


def clt_gemm_flops(B: int, L: int, d: int, n: int) -> int:
    """GEMM FLOPs of one CLT training step (no input gradient)."""
    pairs = L * (L + 1) // 2
    return 4 * B * L * d * n + 6 * B * pairs * n * d


def clt_gemm_peak(B: int, L: int, d: int, n: int, device: torch.device) -> float:
    """FLOP/s of the CLT step's GEMM shapes, each alone into a preallocated output."""
    def mk(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device)

    x, W_enc, f, out_bn, out_dn = mk(B, d), mk(d, n), mk(B, n), mk(B, n), mk(d, n)
    seconds = 0.0
    seconds += L * _time(lambda: torch.mm(x, W_enc, out=out_bn), 2, 5, device)  # encode
    seconds += L * _time(lambda: torch.mm(x.t(), f, out=out_dn), 2, 5, device)  # dW_enc
    for k in range(1, L + 1):  # a source layer writing k target layers
        W, g, out_bk, out_nk = mk(n, k * d), mk(B, k * d), mk(B, k * d), mk(n, k * d)
        seconds += _time(lambda W=W, out=out_bk: torch.mm(f, W, out=out), 2, 5, device)  # decode
        seconds += _time(lambda g=g, out=out_nk: torch.mm(f.t(), g, out=out), 2, 5, device)  # dW_dec
        seconds += _time(lambda W=W, g=g: torch.mm(g, W.t(), out=out_bn), 2, 5, device)  # df
    return clt_gemm_flops(B, L, d, n) / seconds


def clt_step_seconds(B: int, L: int, d: int, n: int, device: torch.device, repeats: int, fused: bool = True) -> float:
    """Median seconds of one CLT training step (forward, backward, Adam, decoder constraint)."""
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(L, d, L * n, fused=fused).to(device).train()
    optimizer = torch.optim.Adam(clt.parameters(), lr=1e-4, betas=(0.5, 0.999), fused=True)
    x = torch.randn(B, L, d, device=device) / d**0.5
    y = torch.randn(B, L, d, device=device) / d**0.5

    def step() -> None:
        out = clt.training_output(x, 1.0, y)
        torch.stack(list(out.losses.values())).sum().backward()
        clt.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        clt.after_optimizer_step()

    return _time(step, 2, repeats, device)


def main(batch: int = 2048, layers: int = 4, d: int = 256, n: int = 4096, device: str = "auto",
         repeats: int = 5) -> dict[str, float]:
    """Print the table and the headline ratios.

    Args:
        batch: Tokens per step.
        layers: Layers L the CLT spans.
        d: Width of the residual stream and of the MLP outputs.
        n: Latents per layer (L n in all).
        device: ``cpu``, ``cuda``, or ``auto`` (CUDA when present, else the CPU).
        repeats: Timed steps per configuration (the median is reported).
    """
    quiet_third_party()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    B, L = batch, layers
    pairs = L * (L + 1) // 2
    flops = clt_gemm_flops(B, L, d, n)
    per_layer_flops = L * 10 * B * d * n
    print(f"CLT step, B={B} L={L} d={d} n={n} ({L * n} latents, {pairs} decoder pairs), {device_name(dev)}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    peak = clt_gemm_peak(B, L, d, n, dev)
    clt = clt_step_seconds(B, L, d, n, dev, repeats)
    plain = clt_step_seconds(B, L, d, n, dev, max(2, repeats // 2), fused=False)
    # L transcoders of n latents: the fused single-site step, L times.
    transcoders = L * bare_step_seconds(B, d, n, dev, fused=True, bf16=False, repeats=repeats)
    rows = [("fp32 GEMM peak (CLT step shapes)", None, flops, peak),
            ("CLT step fp32 (fused)", clt, flops, flops / clt),
            ("CLT step fp32 (autograd)", plain, flops, flops / plain),
            (f"{L} per-layer transcoders fp32 (fused)", transcoders, per_layer_flops, per_layer_flops / transcoders)]
    print(f"\n{'configuration':38s} {'ms/step':>9s} {'tokens/s':>10s} {'GFLOP/step':>11s} {'GFLOP/s':>9s} "
          f"{'of fp32 peak':>13s}")
    for name, seconds, work, rate in rows:
        ms = f"{seconds * 1e3:9.1f}" if seconds else f"{'':9s}"
        tps = f"{B / seconds:10.0f}" if seconds else f"{'':10s}"
        print(f"{name:38s} {ms} {tps} {work / 1e9:11.2f} {rate / 1e9:9.1f} {rate / peak:13.2f}")
    results = {"clt_step_peak_fraction": flops / clt / peak,
               "transcoders_step_peak_fraction": per_layer_flops / transcoders / peak,
               "clt_vs_transcoders_step_seconds": clt / transcoders,
               "clt_fused_vs_autograd": plain / clt}
    print(f"\nthe CLT does {flops / per_layer_flops:.2f}x the per-layer transcoders' GEMM work")
    for key, value in results.items():
        print(f"result: {key} {value:.3f}")
    return results


if __name__ == "__main__":
    CLI(main, as_positional=False)
    sys.stdout.flush()

"""Can this torch put work under CUDA graph IF nodes (conditional nodes, CUDA >= 12.4), gated by device flags?

    python3 bench/conditional_graph_probe.py --out conditional_graph_probe.json

Why: the controller's Stage2 bubble (the GPU idles while the host reads the decision and launches the rest of
the prefill) would go if the rest of the prefill were one graph whose blocks each sit under an IF node reading a
"this block runs" flag that the Stage2 graph writes (top_k is already device data in the fast engine). This probe
checks the pieces on the device: the API (`CUDAGraph.begin_capture_to_if_node`), plain torch ops and an
inductor-compiled (Triton) function inside IF bodies, outputs equal to the eager computation for every flag
pattern, and that a skipped body costs next to nothing at replay. Prints a table and writes JSON.

Seen 2026-11-27: torch 2.11.0+cu130 on the lent H100s has no IF-node API (torch 2.13 has it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def if_body(pred: torch.Tensor):
    """Capture what runs inside into an IF node of the graph being captured, run when `pred` (a CUDA bool
    scalar) is true at replay."""
    g = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    g.begin_capture_to_if_node(pred)
    try:
        yield
    finally:
        g.end_capture_to_conditional_node()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/conditional_graph_probe.json")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--dim", type=int, default=2048)
    args = ap.parse_args()
    out: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d")}
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    out["device"] = torch.cuda.get_device_name(0)
    out["api"] = hasattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph") and hasattr(
        torch.cuda.CUDAGraph, "begin_capture_to_if_node")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {out['device']}: IF-node API {out['api']}")
    if not out["api"]:
        Path(args.out).write_text(json.dumps(out, indent=1))
        return 1
    dev, n, d = torch.device("cuda"), args.blocks, args.dim
    torch.manual_seed(0)
    weights = [torch.randn(d, d, device=dev, dtype=torch.bfloat16) / d ** 0.5 for _ in range(n)]

    @torch.compile(dynamic=False)
    def fused(h: torch.Tensor) -> torch.Tensor:          # inductor emits Triton kernels for this
        return torch.nn.functional.gelu(h.float()).to(h.dtype) * 0.5 + h

    def block(h: torch.Tensor, b: int) -> torch.Tensor:
        return fused(h @ weights[b])

    x = torch.randn(1024, d, device=dev, dtype=torch.bfloat16)
    flags = torch.ones(n, dtype=torch.bool, device=dev)
    h_static = torch.empty_like(x)
    for _ in range(2):                                   # warm the compiled function and cuBLAS outside capture
        block(x, 0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    ok = True
    try:
        with torch.cuda.graph(graph):
            h_static.copy_(x)
            for b in range(n):
                with if_body(flags[b]):
                    h_static.copy_(block(h_static, b))
    except Exception as exc:                             # noqa: BLE001 - reported, not hidden
        out["capture_error"] = f"{type(exc).__name__}: {exc}"
        print(f"capture failed: {out['capture_error']}")
        ok = False
    if ok:
        def eager(pattern):
            h = x.clone()
            for b in range(n):
                if pattern[b]:
                    h = block(h, b)
            return h

        patterns = [[True] * n, [False] * n, [b % 2 == 0 for b in range(n)], [b < n // 2 for b in range(n)]]
        max_diff = 0.0
        for pat in patterns:
            flags.copy_(torch.tensor(pat, device=dev))
            graph.replay()
            torch.cuda.synchronize()
            max_diff = max(max_diff, float((h_static.float() - eager(pat).float()).abs().max()))
        out["max_abs_diff_vs_eager"] = max_diff
        timings = {}
        for name, pat in (("all blocks", patterns[0]), ("no block", patterns[1]), ("half", patterns[3])):
            flags.copy_(torch.tensor(pat, device=dev))
            for _ in range(3):
                graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            timings[name] = start.elapsed_time(end) / 50
        out["replay_ms"] = timings
        print(f"outputs vs eager for {len(patterns)} flag patterns: max |diff| {max_diff:.3g}")
        print("| flags | replay ms |\n|---|---|")
        for name, ms in timings.items():
            print(f"| {name} | {ms:.4f} |")
    out["ok"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

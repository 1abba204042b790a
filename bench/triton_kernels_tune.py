"""Sweep and time the fast engine's Triton kernels on a GPU (issue 8): achieved bandwidth per config.

    python bench/triton_kernels_tune.py --out runs/bench/triton_kernels_tune.json

Full-size MolmoE shapes, bf16. Every timing replays a CUDA graph of 10 launches (no host overhead),
median of 15 replays, with the inputs rotated so weights do not sit in L2:
* expert GEMV (8 experts of 64, one token): gate/up [2048, 2048] and down [2048, 1024] per expert, over a
  grid of (BLOCK_N, BLOCK_K, warps, stages); against the grouped GEMM the generic path uses, a dense
  cuBLAS GEMV over the same bytes, and a device copy (the card's bandwidth);
* decode attention at a 1,215-token context in a 2,048-position cache, per chunk size and warps;
* the prefill epilogue (norms + RoPE + cache writes, 1,280 positions) against the compiled torch maths.
Prints tables (best configs first) and writes JSON. A tuning aid, not a target check.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def graph_us(fn, launches: int = 10, replays: int = 15) -> float:
    """Median microseconds per launch of ``fn`` (a CUDA graph of ``launches`` calls, replayed)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(launches):
            fn(i)
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / launches)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench/triton_kernels_tune.json")
    ap.add_argument("--quick", action="store_true", help="a smaller config grid")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    from rollout_workers import triton_kernels as tk
    import triton
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    E, D, I, k = 64, 2048, 1024, 8
    out: dict = {"card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                 "triton": triton.__version__}
    big = torch.empty(512 * 2 ** 20, dtype=torch.uint8, device=dev)
    big2 = torch.empty_like(big)
    copy_us = graph_us(lambda i: big2.copy_(big))
    out["copy_TBps"] = 2 * big.numel() / (copy_us * 1e-6) / 1e12
    print(f"{out['card']}: device copy {out['copy_TBps']:.2f} TB/s (read + write)", flush=True)
    del big, big2

    idx_sets = [torch.arange(j * k, (j + 1) * k, device=dev, dtype=torch.int32) for j in range(E // k)]
    bns, bks = (4, 8, 16, 32, 64), (128, 256, 512, 1024, 2048)
    warps, stages = ((4, 8), (1, 3)) if args.quick else ((2, 4, 8), (1, 2, 3))
    gemv_rows = []
    for name, N, K in (("gate_up", 2 * I, D), ("down", D, I)):
        w = torch.randn(E, N, K, device=dev, dtype=dt) * K ** -0.5
        x = torch.randn(k, K, device=dev, dtype=dt)
        o = torch.empty(k, N, device=dev, dtype=dt)
        nbytes = k * N * K * 2
        ref = torch.stack([w[e].float() @ x[s].float() for s, e in enumerate(range(k))])
        for bn, bk, nw, ns in itertools.product(bns, bks, warps, stages):
            if bk > K or bn * bk > 32768:
                continue

            def run(i, bn=bn, bk=bk, nw=nw, ns=ns):
                tk._expert_gemv_body[(triton.cdiv(N, bn), k)](w, idx_sets[i % len(idx_sets)], x, o, K, N=N, K=K, E=E,
                                                              BLOCK_N=bn, BLOCK_K=bk, EVEN=True, num_warps=nw,
                                                              num_stages=ns)
            try:
                us = graph_us(run)
                run(0)
                err = float((o.float() - ref).abs().max())
            except Exception as exc:      # a config the compiler rejects (resources)
                print(f"  {name} {bn}x{bk} w{nw} s{ns}: {type(exc).__name__}", flush=True)
                continue
            gemv_rows.append({"kernel": name, "BLOCK_N": bn, "BLOCK_K": bk, "warps": nw, "stages": ns, "us": us,
                              "TBps": nbytes / (us * 1e-6) / 1e12, "max_err": err})
        rows8 = x[:1].expand(k, K).contiguous()
        offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32).clamp(max=k)
        wt = [w[j * k:(j + 1) * k] for j in range(E // k)]
        grouped = graph_us(lambda i: F.grouped_mm(rows8, w.transpose(1, 2), offs=offs))
        dense = graph_us(lambda i: F.linear(x[:1], wt[i % len(wt)].reshape(-1, K)))
        out[f"{name}_grouped_mm_us"], out[f"{name}_dense_gemv_us"] = grouped, dense
        out[f"{name}_dense_gemv_TBps"] = nbytes / (dense * 1e-6) / 1e12
        best = sorted((r for r in gemv_rows if r["kernel"] == name), key=lambda r: r["us"])
        print(f"\n{name} [{N}, {K}] x 8 experts ({nbytes / 1e6:.1f} MB): grouped_mm {grouped:.1f} us, dense cuBLAS "
              f"GEMV over the same bytes {dense:.1f} us ({out[f'{name}_dense_gemv_TBps']:.2f} TB/s)")
        print("| BLOCK_N | BLOCK_K | warps | stages | us | TB/s | max err |\n|---|---|---|---|---|---|---|")
        for r in best[:12]:
            print(f"| {r['BLOCK_N']} | {r['BLOCK_K']} | {r['warps']} | {r['stages']} | {r['us']:.1f} | "
                  f"{r['TBps']:.2f} | {r['max_err']:.3f} |", flush=True)
        del w
    out["gemv"] = gemv_rows

    # decode attention
    H, hd, L, pos = 16, 128, 2048, 1215
    caches = [(torch.randn(16, L, hd, device=dev, dtype=dt), torch.randn(16, L, hd, device=dev, dtype=dt))
              for _ in range(8)]
    q = torch.randn(H, hd, device=dev, dtype=dt)
    p = torch.tensor([pos], device=dev)
    attn_rows = []
    nbytes = 2 * 16 * (pos + 1) * hd * 2
    for chunk, nw in itertools.product((16, 32, 64, 128), (2, 4, 8)):
        n_splits = triton.cdiv(L, chunk)
        acc = torch.empty(H, n_splits, hd, device=dev)
        m = torch.empty(H, n_splits, device=dev)
        ll = torch.empty(H, n_splits, device=dev)
        o = torch.empty(H, hd, device=dev, dtype=dt)

        def run(i, chunk=chunk, nw=nw, n_splits=n_splits, acc=acc, m=m, ll=ll, o=o):
            kc, vc = caches[i % len(caches)]
            tk._attn_split_kernel[(H, n_splits)](q, kc, vc, p, acc, m, ll, hd ** -0.5, L, n_splits, GROUP=1, HD=hd,
                                                 CHUNK=chunk, num_warps=nw)
            tk._attn_combine_kernel[(H,)](acc, m, ll, o, n_splits, S_P2=triton.next_power_of_2(n_splits), HD=hd,
                                          num_warps=4)
        us = graph_us(run)
        attn_rows.append({"chunk": chunk, "warps": nw, "us": us, "TBps": nbytes / (us * 1e-6) / 1e12})
    kc, vc = caches[0]
    mask = (torch.arange(L, device=dev) <= pos).view(1, 1, 1, -1)
    sdpa = graph_us(lambda i: F.scaled_dot_product_attention(q[None, :, None], caches[i % 8][0][None],
                                                             caches[i % 8][1][None], attn_mask=mask, scale=hd ** -0.5))
    out["attention"], out["attention_sdpa_masked_full_cache_us"] = attn_rows, sdpa
    print(f"\ndecode attention, context {pos + 1} of {L} ({nbytes / 1e6:.1f} MB of K/V): SDPA over the masked cache "
          f"{sdpa:.1f} us\n| chunk | warps | us (split + combine) | TB/s |\n|---|---|---|---|")
    for r in sorted(attn_rows, key=lambda r: r["us"])[:8]:
        print(f"| {r['chunk']} | {r['warps']} | {r['us']:.1f} | {r['TBps']:.2f} |", flush=True)
    del caches

    # prefill epilogue
    T, KV = 1280, 16
    proj = torch.randn(T, (H + 2 * KV) * hd, device=dev, dtype=dt)
    qn, kn = torch.ones(H * hd, device=dev, dtype=dt), torch.ones(KV * hd, device=dev, dtype=dt)
    cos, sin = torch.randn(T, hd, device=dev, dtype=dt), torch.randn(T, hd, device=dev, dtype=dt)
    kc, vc = torch.zeros(1, KV, L, hd, device=dev, dtype=dt), torch.zeros(1, KV, L, hd, device=dev, dtype=dt)
    from tests.test_triton_kernels import rope_cache_reference

    def ref_epilogue(proj, qn, kn, cos, sin, kc, vc):
        q, k, v = rope_cache_reference(proj, qn, kn, cos, sin, H, KV, 0.0)
        kc[0, :, :T] = k
        vc[0, :, :T] = v
        return q
    compiled = torch.compile(ref_epilogue, dynamic=True)
    triton_us = graph_us(lambda i: tk.qkv_rope_cache(proj, qn, kn, cos, sin, kc, vc, 1e-5, 0.0))
    compiled_us = graph_us(lambda i: compiled(proj, qn, kn, cos, sin, kc, vc))
    nbytes = 2 * proj.numel() * 2
    out["prefill_epilogue"] = {"positions": T, "triton_us": triton_us, "compiled_torch_us": compiled_us,
                               "triton_TBps": nbytes / (triton_us * 1e-6) / 1e12}
    print(f"\nprefill epilogue ({T} positions): Triton {triton_us:.1f} us ({out['prefill_epilogue']['triton_TBps']:.2f} "
          f"TB/s), compiled torch {compiled_us:.1f} us")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

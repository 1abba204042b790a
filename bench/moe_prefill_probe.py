"""The prefill's routing glue around the expert GEMMs (issue 8): variants of the fast engine's ``moe()``
for one full-size MolmoE block (64 experts, top-8 of k_max 8, d_model 2048, expert hidden 1024, bf16,
random weights), compiled as the engine compiles ``block_prefill`` and replayed in CUDA graphs.

    python bench/moe_prefill_probe.py --out runs/bench/moe_prefill_probe.json

Each variant is compiled with ``torch.compile(fn, dynamic=True)`` (warmed at 17 and 33 rows first, as
``FastEngine.warmup`` does, so the timed lengths run the dynamic kernels), then for every prompt length
(1,216 / 768 / 448 rows: the high / medium / low tiers) and top_k (8 and 4, device data as in the engine)
one CUDA graph per variant is captured after a few warm-up calls and the graphs are replayed in turn,
``--replays`` times each, with CUDA events around every replay; the table gives the median per call in
microseconds and each variant's max |difference| from ``current`` (same input, bf16).

Variants (all the same maths: same experts, same weights, the k slots summed in ascending expert order,
inactive slots adding 0; no host syncs, no data-dependent shapes):

* ``current``: the routing before this probe (one-hot cumsum counting sort over [N*k_max, E+1] of the
  per-token sorted slots, rows built by ``repeat_interleave`` + ``index_copy_``), kept in the tests as
  ``tests.test_fast_engine.moe_onehot_reference``;
* ``engine``: ``rollout_workers.fast_engine.moe`` as it is now (no sort: a cumsum over the tokens of an
  [N, E] selection gives each pair's grouped row, k_max^2 compares its slot; rows gathered from ``x``;
  the expert outputs gathered back, weighted and summed in one pass);
* ``sort``: the per-token sort kept, then a stable ``torch.sort`` of the flat expert ids for the grouped
  order, rows gathered with ``index_select``, group ends by ``searchsorted``;
* ``rank`` (only with ``--variants ... rank``): like ``engine`` without ``torch.topk``: an expert is active
  when fewer than top_k experts beat its probability (E^2 compares per token, ties to the lower expert
  id). NOT the same experts: ``torch.topk`` breaks ties its own way, and ties at the top_k boundary are
  common with bf16 logits (on CPU, bf16, 16 experts: about 1 token in 100), so its |diff| is large at
  those tokens; it only measures what ``torch.topk`` costs.

``engine`` differs from ``current`` by bf16 round-off when compiled: its fused gather-weight-sum keeps
the k weighted outputs in float32 before the sum, where ``current``'s compiled code stores them in bf16
first (an extra [N*k_max, D] write and read). Uncompiled (eager) the two are bit-identical.

``--cpu-smoke`` runs the same variants uncompiled on CPU in float32 at tiny sizes (E 8, d_model 64,
hidden 32, 37 rows), where every variant must equal ``current`` exactly (timings there mean nothing):

    python bench/moe_prefill_probe.py --cpu-smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rollout_workers.fast_engine import BlockWeights, Shape, capture_graph, expert_mm, moe  # noqa: E402
# the routing before the sort-free one: kept in the tests as the reference it must equal
from tests.test_fast_engine import moe_onehot_reference  # noqa: E402


def moe_stable_sort(w: BlockWeights, s: Shape, x: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Prefill only: per-token sort as ``current``, then a stable sort of the flat expert ids (the same
    grouped order as the counting sort), rows gathered from ``x``, group ends by ``searchsorted``."""
    n, E, kmax = x.shape[0], w.router.shape[0], s.k_max
    logits = F.linear(x, w.router)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, idx = torch.topk(probs, kmax, dim=-1)
    rank = torch.arange(kmax, device=x.device)
    idx = torch.where(rank < top_k, idx, E)
    idx, order = idx.sort(dim=-1)
    weights = weights.gather(-1, order).to(logits.dtype)
    flat = idx.reshape(-1)
    expert_of_row, pair = torch.sort(flat, stable=True)                     # grouped row -> (token, slot) pair
    dest = torch.empty_like(pair).scatter_(0, pair, torch.arange(n * kmax, device=x.device))
    rows = x.index_select(0, pair // kmax)
    offs = torch.searchsorted(expert_of_row, torch.arange(1, E + 1, device=x.device), out_int32=True)
    gate, up = expert_mm(rows, w.gate_up, expert_of_row, offs, s.grouped).chunk(2, dim=-1)
    out = expert_mm(F.silu(gate) * up, w.down, expert_of_row, offs, s.grouped)
    out = torch.where((expert_of_row < E)[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    routed = out[dest].view(n, kmax, -1) * weights[..., None]
    acc = routed[:, 0]
    for j in range(1, kmax):
        acc = acc + routed[:, j]
    return acc


def moe_rank(w: BlockWeights, s: Shape, x: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Prefill only: ``engine`` without ``torch.topk``: an expert is active when fewer than top_k experts
    beat its probability (E^2 compares per token; ties go to the lower expert id); slots, grouped rows and
    the sum as ``engine``."""
    n, E, kmax, dev = x.shape[0], w.router.shape[0], s.k_max, x.device
    logits = F.linear(x, w.router)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)             # [N, E]
    experts = torch.arange(E, device=dev)
    p, q = probs[:, :, None], probs[:, None, :]
    beats = (q > p) | ((q == p) & (experts < experts[:, None]))            # [N, e, e']: e' ranks above e
    sel = (beats.sum(-1) < torch.clamp(top_k, max=kmax)).to(torch.int32)  # [N, E] 0/1
    slot_e = torch.cumsum(sel, 1, dtype=torch.int32) - sel                  # [N, E] place in ascending order
    csum = torch.cumsum(sel, 0, dtype=torch.int32)
    counts = csum[-1]
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    dest_e = (offs - counts) + csum - sel                                   # [N, E] grouped row if selected
    rank = torch.arange(kmax, device=dev)
    hit = (sel[:, None, :] > 0) & (slot_e[:, None, :] == rank[:, None])     # [N, slot, E]
    active = rank < top_k
    tok = torch.arange(n, device=dev)[:, None]
    g = torch.where(active, torch.where(hit, dest_e[:, None, :], 0).sum(-1),
                    offs[-1] + tok * (kmax - top_k) + (rank - top_k)).long()   # [N, kmax]
    ws = torch.where(hit, probs[:, None, :], 0.0).sum(-1).to(x.dtype)
    expert_sorted = torch.where(active, torch.where(hit, experts, 0).sum(-1), E)
    token_of_row = torch.empty(n * kmax, dtype=torch.long, device=dev).index_copy_(
        0, g.view(-1), tok.expand(n, kmax).reshape(-1))
    expert_of_row = torch.empty(n * kmax, dtype=torch.long, device=dev).index_copy_(
        0, g.view(-1), expert_sorted.reshape(-1))
    rows = x[token_of_row]
    gate, up = expert_mm(rows, w.gate_up, expert_of_row, offs, s.grouped).chunk(2, dim=-1)
    out = expert_mm(F.silu(gate) * up, w.down, expert_of_row, offs, s.grouped)
    routed = out[g] * ws[..., None]
    zero = torch.zeros((), dtype=out.dtype, device=dev)
    acc = torch.where(top_k > 0, routed[:, 0], zero)
    for j in range(1, kmax):
        acc = acc + torch.where(top_k > j, routed[:, j], zero)
    return acc


VARIANTS = {"current": moe_onehot_reference, "engine": moe, "sort": moe_stable_sort, "rank": moe_rank}


def block_moe_weights(E: int, D: int, I: int, device, dtype, seed: int = 0) -> BlockWeights:
    """Random router and experts in BlockWeights' layout (the attention fields are unused by moe())."""
    g = torch.Generator(device=device).manual_seed(seed)
    router = torch.randn(E, D, device=device, dtype=dtype, generator=g) * D ** -0.5
    gate_up = torch.randn(E, 2 * I, D, device=device, dtype=dtype, generator=g) * D ** -0.5
    down = torch.randn(E, D, I, device=device, dtype=dtype, generator=g) * I ** -0.5
    return BlockWeights(None, None, None, None, None, None, router, gate_up, down)


def graph_times_us(fns: dict, replays: int) -> tuple[dict, dict]:
    """Capture one CUDA graph per zero-argument callable (`fast_engine.capture_graph`: two warm-up calls on a
    side stream first), then replay the graphs in turn ``replays`` times with CUDA events around each replay.
    Returns the median microseconds per variant and each graph's output."""
    graphs, outs = {}, {}
    for name, fn in fns.items():
        def keep(fn=fn, name=name):      # the captured call's output is the graph's output buffer
            outs[name] = fn()
        graphs[name] = capture_graph(keep)
    for g in graphs.values():
        for _ in range(3):
            g.replay()
    events = {name: [] for name in graphs}
    for _ in range(replays):
        for name, g in graphs.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            events[name].append((a, b))
    torch.cuda.synchronize()
    times = {name: statistics.median(a.elapsed_time(b) * 1e3 for a, b in ev) for name, ev in events.items()}
    return times, {name: o.clone() for name, o in outs.items()}


def cpu_times_us(fns: dict, replays: int) -> tuple[dict, dict]:
    """The CPU smoke counterpart of :func:`graph_times_us`: plain calls, wall-clock medians."""
    times, outs = {}, {}
    for name, fn in fns.items():
        outs[name] = fn()
        ts = []
        for _ in range(replays):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        times[name] = statistics.median(ts)
    return times, outs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="default runs/bench/moe_prefill_probe.json "
                    "(moe_prefill_probe_cpu_smoke.json with --cpu-smoke)")
    ap.add_argument("--variants", nargs="+", default=["current", "engine", "sort"], choices=list(VARIANTS),
                    help="current is always run (the reference); rank only when named")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1216, 768, 448])
    ap.add_argument("--top-k", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--cpu-smoke", action="store_true", help="uncompiled, CPU, float32, tiny sizes")
    args = ap.parse_args()
    out_path = Path(args.out or ("runs/bench/moe_prefill_probe_cpu_smoke.json" if args.cpu_smoke
                                 else "runs/bench/moe_prefill_probe.json"))
    variants = ["current"] + [v for v in args.variants if v != "current"]
    if args.cpu_smoke:
        dev, dt, compile_ = torch.device("cpu"), torch.float32, False
        E, D, I, kmax, tokens, replays = 8, 64, 32, 8, [37], 5
    else:
        if not torch.cuda.is_available():
            print("needs a CUDA GPU (or --cpu-smoke)")
            return 2
        dev, dt, compile_ = torch.device("cuda"), torch.bfloat16, True
        E, D, I, kmax, tokens, replays = 64, 2048, 1024, 8, args.tokens, args.replays
    from rollout_workers.fast_engine import grouped_mm_supported
    torch.set_grad_enabled(False)
    s = Shape(n_heads=16, n_kv=16, head_dim=D // 16, eps=1e-5, clip_qkv=None, k_max=kmax, scaling=1.0,
              grouped=grouped_mm_supported(dev, dt))
    w = block_moe_weights(E, D, I, dev, dt)
    report: dict = {"card": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                    "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu_smoke": args.cpu_smoke,
                    "sizes": {"E": E, "D": D, "I": I, "k_max": kmax, "dtype": str(dt), "grouped": s.grouped},
                    "replays": replays, "compile_s": {}, "rows": []}
    fns = {}
    for name in variants:
        fn = VARIANTS[name]
        if compile_:
            t0 = time.perf_counter()
            fn = torch.compile(fn, dynamic=True)
            for n in (17, 33):     # as FastEngine.warmup: the timed lengths then run the dynamic kernels
                fn(w, s, torch.zeros(n, D, device=dev, dtype=dt), torch.tensor(kmax, device=dev))
            torch.cuda.synchronize()
            report["compile_s"][name] = round(time.perf_counter() - t0, 1)
            print(f"compiled {name} in {report['compile_s'][name]:.1f} s", flush=True)
        fns[name] = fn
    from torch._dynamo.utils import counters
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    gen = torch.Generator(device=dev).manual_seed(1)
    for n in tokens:
        x = torch.randn(n, D, device=dev, dtype=dt, generator=gen)
        for k in args.top_k:
            top_k = torch.tensor(k, device=dev)
            calls = {name: (lambda fn=fn, x=x, top_k=top_k: fn(w, s, x, top_k)) for name, fn in fns.items()}
            times, outs = (graph_times_us if dev.type == "cuda" else cpu_times_us)(calls, replays)
            ref = outs["current"].float()
            for name in variants:
                diff = float((outs[name].float() - ref).abs().max())
                report["rows"].append({"variant": name, "tokens": n, "top_k": k, "us": round(times[name], 1),
                                       "max_abs_diff_vs_current": diff,
                                       "equal_to_current": bool(torch.equal(outs[name], outs["current"])),
                                       "out_max_abs": float(ref.abs().max())})
    # compilations at the timed lengths (0 expected: the warm-up compiled a dynamic length)
    report["recompiles_after_warmup"] = counters["stats"]["unique_graphs"] - graphs_after_warmup
    print(f"\n{report['card']}, torch {torch.__version__}: moe() per call, median of {replays} "
          f"{'graph replays' if dev.type == 'cuda' else 'uncompiled CPU calls'} (us); "
          "max |diff| from current")
    print(f"{'tokens':>6} {'top_k':>5} " + " ".join(f"{v:>20}" for v in variants))
    for n in tokens:
        for k in args.top_k:
            cells = []
            for v in variants:
                r = next(r for r in report["rows"] if (r["variant"], r["tokens"], r["top_k"]) == (v, n, k))
                cells.append(f"{r['us']:>9.1f} ({r['max_abs_diff_vs_current']:.1e})")
            print(f"{n:>6} {k:>5} " + " ".join(f"{c:>20}" for c in cells))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    print(f"recompiles after warm-up: {report['recompiles_after_warmup']}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

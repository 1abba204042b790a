"""Knob table of the embedded tiny MolmoE (issue 6 point 3).

For every knob combination at p = 1 (tier x top_k x num_blocks), serves held-out shapes questions
through `RequestEngine.serve` with fixed knobs (controller=None, the plain path) on the CPU with a fixed
torch thread count, and reports accuracy per question family and latency. Then checks the targets:
  - full compute accuracy >= 80%;
  - the cheapest combination >= 15 points lower and >= 1.5x faster (median latency);
  - at some budget, choosing the best combination per question family (each within the budget) beats
    the best single combination within that budget by >= 10 points.

    PYTHONPATH=. python bench/tiny_knob_table.py --per-family 50 --threads 1 \
        --out-json docs/tiny_knob_table.json --out-md docs/tiny_knob_table.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def knob_space(folder: Path):
    from shared.knobs import KnobSpace
    k = json.loads((folder / "knobs.json").read_text())
    return KnobSpace(tuple(k["tier_names"]), tuple(k["tier_max_crops"]), tuple(k["insertion_positions"]),
                     tuple(k["top_k_options"]), tuple(k["num_blocks_options"]), k["num_layers"],
                     k["num_experts"], k["native_top_k"])


def run_combos(folder: Path, combos: list[dict], per_family: int, split: str, seed: int, threads: int,
               warmup: int = 3) -> list[dict]:
    import torch
    torch.set_num_threads(threads)
    from rollout_workers.molmoe import load_molmoe
    from rollout_workers.request_path import RequestEngine
    from shared import shapes
    from shared.knobs import ImportanceScores, KnobChoice
    from shared.scorers import score

    m = load_molmoe(folder, device="cpu", dtype=torch.float32)
    space = knob_space(folder)
    imp_path = folder / "importance.json"
    importance = (ImportanceScores.load(imp_path, space.num_layers) if imp_path.is_file()
                  else ImportanceScores.by_index(space.num_layers))
    eng = RequestEngine(m.model, m.preprocessor, space, importance)
    n = per_family * len(shapes.FAMILIES)
    items = shapes.shapes_items(split, n, seed)
    out = []
    for c in combos:
        ch = KnobChoice(**c)
        for it in items[:warmup]:
            eng.serve(it.image, it.question, 10_000.0, fixed=ch, max_new_tokens=shapes.MAX_NEW_TOKENS)
        acc: dict[str, list[float]] = {}
        lat = []
        for it in items:
            r = eng.serve(it.image, it.question, 10_000.0, fixed=ch, max_new_tokens=shapes.MAX_NEW_TOKENS)
            acc.setdefault(it.question_type, []).append(score("exact", r.answer, it.answers))
            lat.append(r.latency_ms)
        row = dict(c, block_ids=r.block_ids, num_crops=r.num_crops, prompt_tokens=r.prompt_tokens,
                   latency_ms_median=statistics.median(lat), latency_ms_mean=statistics.fmean(lat),
                   accuracy=statistics.fmean(v for vs in acc.values() for v in vs),
                   family_accuracy={f: statistics.fmean(v) for f, v in sorted(acc.items())}, n=len(items))
        print(f"{c['tier']:>4} k={c['top_k']} nb={c['num_blocks']}: acc {row['accuracy']:.3f} "
              f"lat {row['latency_ms_median']:.1f} ms  " +
              " ".join(f"{f}={a:.2f}" for f, a in row["family_accuracy"].items()), flush=True)
        out.append(row)
    return out


def analyse(rows: list[dict], full: dict, families: list[str]) -> dict:
    key = lambda r: (r["tier"], r["top_k"], r["num_blocks"])  # noqa: E731
    by = {key(r): r for r in rows}
    f = by[(full["tier"], full["top_k"], full["num_blocks"])]
    # the cheapest combination by construction: lowest tier, smallest top_k, fewest blocks
    cheapest = min(rows, key=lambda r: (r["max_crops"], r["top_k"], r["num_blocks"]))
    fastest = min(rows, key=lambda r: r["latency_ms_median"])
    best_gain = {"gain": -1.0}
    curve = []
    for b in sorted({r["latency_ms_median"] for r in rows}):
        ok = [r for r in rows if r["latency_ms_median"] <= b]
        single = max(ok, key=lambda r: r["accuracy"])
        per_fam = {fam: max(ok, key=lambda r: r["family_accuracy"][fam]) for fam in families}
        oracle = statistics.fmean(per_fam[fam]["family_accuracy"][fam] for fam in families)
        point = {"budget_ms": b, "best_single": single["accuracy"], "best_single_combo": key(single),
                 "per_family": oracle, "per_family_combos": {fam: key(r) for fam, r in per_fam.items()},
                 "gain": oracle - single["accuracy"]}
        curve.append(point)
        if point["gain"] > best_gain["gain"]:
            best_gain = point
    return {
        "full_compute": {"combo": key(f), "accuracy": f["accuracy"], "latency_ms": f["latency_ms_median"]},
        "cheapest": {"combo": key(cheapest), "accuracy": cheapest["accuracy"],
                     "latency_ms": cheapest["latency_ms_median"]},
        "fastest_measured": {"combo": key(fastest), "accuracy": fastest["accuracy"],
                             "latency_ms": fastest["latency_ms_median"]},
        "accuracy_drop_points": 100 * (f["accuracy"] - cheapest["accuracy"]),
        "latency_ratio": f["latency_ms_median"] / cheapest["latency_ms_median"],
        "best_per_family_gain_points": 100 * best_gain["gain"],
        "best_per_family_gain_at": best_gain,
        "budget_curve": curve,
        "targets": {
            "full_compute_acc>=0.80": f["accuracy"] >= 0.80,
            "cheapest_drop>=15pts": 100 * (f["accuracy"] - cheapest["accuracy"]) >= 15,
            "latency_ratio>=1.5": f["latency_ms_median"] / cheapest["latency_ms_median"] >= 1.5,
            "per_family_gain>=10pts": 100 * best_gain["gain"] >= 10,
        },
    }


def to_markdown(res: dict) -> str:
    fams = res["families"]
    short = {f: f.replace("large_", "L.").replace("small_", "S.").replace("checker_", "C.").replace("_color", "_col")
             for f in fams}
    a = res["analysis"]
    lines = [f"Model `{res['model']}`, {res['n_per_combo']} `{res['split']}` questions per combination "
             f"({res['n_per_combo'] // len(fams)} per family), p = 1, plain path (controller=None), "
             f"CPU {res['cpu']}, torch threads = {res['threads']}; latency = median end-to-end `latency_ms`.",
             "",
             "| tier (max_crops) | top_k | blocks | latency ms | accuracy | " + " | ".join(short[f] for f in fams) + " |",
             "|---|---|---|---|---|" + "---|" * len(fams)]
    for r in sorted(res["rows"], key=lambda r: r["latency_ms_median"]):
        lines.append(f"| {r['tier']} ({r['max_crops']}) | {r['top_k']} | {r['num_blocks']} | "
                     f"{r['latency_ms_median']:.1f} | {100 * r['accuracy']:.1f} | " +
                     " | ".join(f"{100 * r['family_accuracy'][f]:.0f}" for f in fams) + " |")
    g = a["best_per_family_gain_at"]
    lines += ["",
              f"- full compute {a['full_compute']['combo']}: **{100 * a['full_compute']['accuracy']:.1f}%** "
              f"at {a['full_compute']['latency_ms']:.1f} ms (target >= 80%)",
              f"- cheapest {a['cheapest']['combo']}: {100 * a['cheapest']['accuracy']:.1f}% at "
              f"{a['cheapest']['latency_ms']:.1f} ms: **{a['accuracy_drop_points']:.1f} points lower** (target >= 15), "
              f"**{a['latency_ratio']:.2f}x** faster (target >= 1.5x)",
              f"- best per-family choice vs best single combination: **+{a['best_per_family_gain_points']:.1f} "
              f"points** at a budget of {g['budget_ms']:.1f} ms (single {g['best_single_combo']}: "
              f"{100 * g['best_single']:.1f}%; per family {100 * g['per_family']:.1f}%: "
              + ", ".join(f"{short[f]} {c}" for f, c in g["per_family_combos"].items()) + ") (target >= 10)",
              f"- targets met: {a['targets']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Knob table of the tiny MolmoE (accuracy per family, CPU latency)")
    ap.add_argument("--model", default=str(ROOT / "assets" / "tiny_molmoe"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-family", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-json", default=str(ROOT / "docs" / "tiny_knob_table.json"))
    ap.add_argument("--out-md", default=str(ROOT / "docs" / "tiny_knob_table.md"))
    ap.add_argument("--limit", type=int, default=0, help="only the first N combinations (smoke tests)")
    ap.add_argument("--top-k", default="", help="comma list: only combinations with these top_k (quick screening)")
    ap.add_argument("--reanalyse", action="store_true", help="recompute the analysis and markdown from --out-json")
    args = ap.parse_args(argv)
    if args.reanalyse:
        res = json.loads(Path(args.out_json).read_text())
        res["analysis"] = analyse(res["rows"], {"tier": res["analysis"]["full_compute"]["combo"][0],
                                                "top_k": res["analysis"]["full_compute"]["combo"][1],
                                                "num_blocks": res["analysis"]["full_compute"]["combo"][2]},
                                  res["families"])
        Path(args.out_json).write_text(json.dumps(res, indent=2))
        md = to_markdown(res)
        Path(args.out_md).write_text(md)
        print(md)
        return 0

    from shared import shapes
    folder = Path(args.model)
    space = knob_space(folder)
    combos = [c.__dict__ for c in space.static_choices(1)]
    if args.top_k:
        keep = {int(k) for k in args.top_k.split(",")}
        combos = [c for c in combos if c["top_k"] in keep]
    if args.limit:
        combos = combos[: args.limit]
    full = space.full_compute().__dict__
    if full not in combos:
        combos.append(full)
    t0 = time.time()
    rows = run_combos(folder, combos, args.per_family, args.split, args.seed, args.threads)
    fams = list(shapes.FAMILIES)
    res = {"model": os.path.relpath(folder, ROOT) if folder.is_relative_to(ROOT) else str(folder),
           "split": args.split, "seed": args.seed, "n_per_combo": rows[0]["n"], "families": fams,
           "threads": args.threads, "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "command": "PYTHONPATH=. python bench/tiny_knob_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "seconds": round(time.time() - t0, 1), "rows": rows}
    res["analysis"] = analyse(rows, full, fams)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    Path(args.out_md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

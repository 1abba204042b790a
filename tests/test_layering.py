"""Pure logic imports neither Ray nor the model; Ray only where actors are built; docs stay current."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PURE = ["shared.config", "shared.knobs", "shared.controller", "shared.records", "shared.scorers", "shared.rewards",
        "shared.backend", "shared.budgets", "shared.metrics", "learner.grpo", "learner.trainer", "learner.dispenser",
        "learner.checkpoint", "learner.learner", "rollout_workers.worker", "rollout_workers.synthetic_backend"]


def test_pure_modules_import_without_ray_or_model():
    code = ("import sys; sys.modules['ray'] = None\n"
            f"import importlib\nfor m in {PURE!r}: importlib.import_module(m)\n"
            "bad = [m for m in sys.modules if m.startswith(('ray.', 'rollout_workers.molmoe', 'transformers'))]\n"
            "assert not bad, bad\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_ray_is_imported_only_in_jobs():
    offenders = []
    for pkg in ("shared", "learner", "rollout_workers"):
        for f in (ROOT / pkg).rglob("*.py"):
            text = f.read_text()
            if "import ray" in text or "from ray" in text:
                offenders.append(str(f.relative_to(ROOT)))
    assert not offenders, offenders


def test_config_reference_is_current():
    from shared.config import reference_markdown
    assert (ROOT / "docs" / "CONFIG.md").read_text() == reference_markdown(), \
        "docs/CONFIG.md is stale: run `python -m shared.config > docs/CONFIG.md`"

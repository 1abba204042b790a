"""Shipped configuration files checked without a cluster: cluster.yaml against Ray's own cluster-launcher
schema (and Ray's config preparation), and the Grafana dashboard against the metric registry."""
from __future__ import annotations

import copy
import json
import os
import re

import pytest
import yaml

from conftest import REPO

CLUSTER_YAML = REPO / "cluster.yaml"
DASHBOARD = REPO / "docs" / "grafana" / "budgetctl_dashboard.json"


@pytest.fixture(scope="module")
def cluster_cfg():
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def ray_schema():
    import ray.autoscaler
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as fh:
        return json.load(fh)


def test_cluster_yaml_matches_ray_schema(cluster_cfg, ray_schema):
    import jsonschema
    jsonschema.validate(cluster_cfg, ray_schema)               # as written
    from ray.autoscaler._private.util import prepare_config, validate_config
    prepared = prepare_config(copy.deepcopy(cluster_cfg))      # merged with the provider's defaults,
    validate_config(prepared)                                  # as `ray up` does before launching
    assert prepared["available_node_types"]["head.cpu"]["max_workers"] == 0


def test_schema_check_has_teeth(cluster_cfg, ray_schema):
    import jsonschema
    for mutate in (lambda c: c.update(nonsense=1),
                   lambda c: c["available_node_types"]["worker.gpu"].update(min_workers="two"),
                   lambda c: c.update(head_start_ray_commands="ray start --head"),
                   lambda c: c.pop("provider")):
        bad = copy.deepcopy(cluster_cfg)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, ray_schema)


def test_cluster_layout_and_security(cluster_cfg):
    types = cluster_cfg["available_node_types"]
    head = types[cluster_cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0                # CPU head
    gpu_types = [t for name, t in types.items() if name != cluster_cfg["head_node_type"]]
    assert gpu_types and all(t["resources"]["GPU"] >= 1 for t in gpu_types)
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster_cfg["max_workers"]
    head_start = " ".join(cluster_cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start           # reached through `ray dashboard` only
    assert "--num-gpus=0" in head_start
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
    for cmd in cluster_cfg["head_start_ray_commands"] + cluster_cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd                  # token auth on every node
            assert "--disable-usage-stats" in cmd
    assert "~/.ray/auth_token" in cluster_cfg["file_mounts"]
    assert any('"ray[default]==' in c for c in cluster_cfg["setup_commands"])


def test_ray_version_pinned_in_cluster_matches_installed(cluster_cfg):
    import ray
    pins = {m for c in cluster_cfg["setup_commands"] for m in re.findall(r'ray\[default\]==([\d.]+)', c)}
    assert pins == {ray.__version__}, "client and cluster must run the same Ray version"


def test_dashboard_names_every_metric():
    from shared.metrics import METRICS
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\bray_budgetctl_[a-z0-9_]+", e)}
    for name, (kind, *_rest) in METRICS.items():
        assert not name.endswith("_total"), f"{name}: Prometheus adds _total to counters itself"
        exported = {"counter": f"ray_{name}_total", "gauge": f"ray_{name}",
                    "histogram": f"ray_{name}_bucket"}[kind]
        assert exported in names, f"the dashboard does not show {name} ({exported})"
    known = {f"ray_{n}{s}" for n in METRICS for s in ("", "_total", "_bucket", "_count", "_sum")}
    assert names <= known, f"the dashboard names unknown metrics: {names - known}"
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert dash["uid"] and dash["title"]

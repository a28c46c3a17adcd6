"""docker/'s monitoring: the alert rules load in Prometheus's own checker and fire (or stay quiet) on
the series of docker/prometheus/alerts_test.yml, and every metric the rules and the Grafana dashboard
read, and README and docs/ name, is one the sidecar exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from sidecar.serving import metrics  # noqa: F401  (registers the sidecar's metrics)

ROOT = Path(__file__).parents[2]
PROMETHEUS = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "clip-sidecar.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def promtool() -> str:
    """Prometheus's rule checker: on PATH, or where scripts/install-promtool puts it (beside the venv's python)."""
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("promtool not found (on PATH or beside this python): scripts/install-promtool installs it "
                    "from Debian's prometheus package")
    return found


def test_alert_rules_pass_promtools_rule_check():
    result = subprocess.run([promtool(), "check", "rules", str(PROMETHEUS / "alerts.yml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_each_alert_fires_on_its_series_and_stays_quiet_otherwise_in_promtools_unit_tests():
    result = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_series() -> set[str]:
    return {family.name + suffix for family in REGISTRY.collect() if family.name.startswith("sidecar_")
            for suffix in SUFFIXES.get(family.type, ("",))}


def test_every_sidecar_series_the_rules_and_dashboard_read_is_one_the_sidecar_exports():
    exported = exported_series()
    for path in (PROMETHEUS / "alerts.yml", PROMETHEUS / "alerts_test.yml", DASHBOARD):
        read = set(re.findall(r"\bsidecar_[a-z0-9_]+", path.read_text(encoding="utf-8")))
        assert read and read <= exported, (path.name, sorted(read - exported))


def test_every_sidecar_metric_readme_and_docs_name_is_exported_under_that_name():
    # A histogram is named by its family (sidecar_stage_seconds) as well as by its series; a counter
    # only by its series (sidecar_requests_total): a query of the bare name finds nothing.
    histograms = {family.name for family in REGISTRY.collect() if family.type == "histogram"}
    exported = exported_series() | histograms
    for path in (ROOT / "README.md", *(ROOT / "docs").glob("*.md")):
        named = {name for name in re.findall(r"`(sidecar_[a-z0-9_]+)", path.read_text(encoding="utf-8"))}
        assert named <= exported, (path.name, sorted(named - exported))


def test_every_metric_the_sidecar_exports_is_named_in_readme_or_docs():
    documented = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "README.md", *(ROOT / "docs").glob("*.md")))
    # As an operator queries it: a counter by its series (…_total), a histogram or gauge by its family.
    exported = {family.name + ("_total" if family.type == "counter" else "") for family in REGISTRY.collect()
                if family.name.startswith("sidecar_")}
    assert exported and not {name for name in exported if f"`{name}" not in documented}


def _container_path(service: dict, path: str) -> Path | None:
    """The checkout file a path inside the container is, through the service's bind mounts of ./ paths."""
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./") and (path == target or path.startswith(target + "/")):
            return ROOT / source / path[len(target):].lstrip("/")
    return None


def test_grafana_opens_the_mounted_dashboard_whose_panels_read_the_provisioned_prometheus():
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]["grafana"]
    home = _container_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == DASHBOARD and home.is_file()
    provisioned = {source["uid"] for path in (ROOT / "docker/grafana/provisioning/datasources").glob("*.yml")
                   for source in yaml.safe_load(path.read_text(encoding="utf-8"))["datasources"]}
    used = set(re.findall(r'"datasource": \{[^}]*"uid": "([^"]+)"', json.dumps(json.loads(DASHBOARD.read_text()))))
    assert used and used <= provisioned, (used, provisioned)

"""The shipped Prometheus rules (`deploy/prometheus/`): valid, unit-tested by `promtool test rules` with a
firing and a non-firing case per alert, and each alert with its runbook section in docs/operations.md."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import unavailable

ROOT = pathlib.Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus"


def promtool() -> str:
    return shutil.which("promtool") or unavailable("promtool is not installed (apt-get install prometheus)")


def alerts() -> list[dict]:
    groups = yaml.safe_load((RULES / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.mark.parametrize("check", [["check", "config", "prometheus.yml"], ["test", "rules", "rules.test.yml"]])
def test_promtool_accepts_the_config_and_passes_the_rule_tests(check):
    run = subprocess.run([promtool(), *check], cwd=RULES, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_is_tested_firing_and_not_firing():
    tests = yaml.safe_load((RULES / "rules.test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for alert in alerts():
        firing = [c for c in cases if c["alertname"] == alert["alert"] and c["exp_alerts"]]
        assert firing, f"{alert['alert']} has no case that makes it fire"
        # a listed case is the whole set of alerts at that time: instance "b" (or a second series) must not fire
        assert any(c["alertname"] == alert["alert"] and not c["exp_alerts"] for c in cases) or all(
            len(c["exp_alerts"]) == 1 for c in firing
        ), f"{alert['alert']} has no case where it must stay silent"


def test_every_alert_has_a_summary_a_description_and_its_runbook_section():
    text = (ROOT / "docs" / "operations.md").read_text()
    sections = {re.sub(r"[^a-z0-9]", "", h.lower()) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for alert in alerts():
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], alert["alert"]
        anchor = alert["alert"].lower()
        assert notes["runbook_url"] == f"docs/operations.md#{anchor}", alert["alert"]
        assert anchor in sections, f"docs/operations.md has no section for {alert['alert']}"

"""examples/backend_template: the out-of-tree package a vendor copies. It must install with
pip (here into a temporary --target, offline), be found through its entry point, and pass
`portinfer check` for the ops it declares, with the rest listed as unsupported."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from portinfer import cli
from portinfer.backends import registry

from conftest import CONFORMANCE_SEED

TEMPLATE = Path(__file__).resolve().parent.parent / "examples" / "backend_template"


@pytest.fixture
def installed_template(tmp_path, monkeypatch):
    pytest.importorskip("setuptools", reason="building the template with --no-build-isolation needs setuptools "
                                             "in this environment (torch's wheels depend on it)")
    source, target = tmp_path / "source", tmp_path / "site"
    shutil.copytree(TEMPLATE, source)  # pip builds in place: keep the repo's copy clean
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True, text=True)
    monkeypatch.syspath_prepend(str(target))
    registry.refresh()
    yield target
    sys.modules.pop("portinfer_backend_template", None)
    monkeypatch.undo()
    registry.refresh()


def test_template_installs_with_pip_and_passes_check(installed_template, capsys):
    assert "template" not in [e.name for e in registry.entries() if e.origin == "builtin"]
    entry = registry.entry("template")
    assert entry.origin == "entry point (portinfer-backend-template)"
    assert entry.status() == (True, "")
    assert Path(sys.modules["portinfer_backend_template"].__file__).parent == installed_template

    code = cli.main(["check", "--backend", "template", "--profile", "small", "--max-examples", "5",
                     "--seed", str(CONFORMANCE_SEED), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"], report
    declared = ("linear", "rms_norm", "silu_mul")
    for row in report["results"]:
        expected = "pass" if row["op"] in declared else "unsupported"  # linear[q8_0] etc. fall back
        assert row["status"] == expected, (row["op"], row["dtype"], row["status"])
        assert (row["cases"] > 0) == (expected == "pass")
    assert sum(r["status"] == "pass" for r in report["results"]) == 3 * len(declared)

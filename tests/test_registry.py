"""Registry: built-ins, entry-point plugins (a real dist-info on sys.path), protocol versions."""
import json
import sys
import textwrap

import pytest

import portinfer
from portinfer import cli
from portinfer.backends import PROTOCOL_VERSION, registry


def _install_plugin(tmp_path, dist, name, module, protocol):
    """A minimal installed distribution: a module plus dist-info with an entry point."""
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        from portinfer.backends.torch_backend import TorchBackend

        class PluginBackend(TorchBackend):
            name = "{name}"
            protocol_version = {protocol}
    """))
    info = tmp_path / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[portinfer.backends]\n{name} = {module}:PluginBackend\n")


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    _install_plugin(tmp_path, "good_plugin", "good-plugin", "good_plugin_mod", PROTOCOL_VERSION)
    _install_plugin(tmp_path, "old_plugin", "old-plugin", "old_plugin_mod", PROTOCOL_VERSION + 1)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield
    for mod in ("good_plugin_mod", "old_plugin_mod"):
        sys.modules.pop(mod, None)
    monkeypatch.undo()
    registry.refresh()


def test_builtins_listed():
    names = portinfer.backends.names()
    for name in ("reference", "torch", "cpu", "triton", "ascend", "kunlun"):
        assert name in names
    assert portinfer.backends.available("reference") and portinfer.backends.available("torch")


def test_unknown_backend_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown name 'nope'.*torch"):
        portinfer.backends.get("nope")


def test_entry_point_plugin_is_listed_and_checked(plugins):
    assert "good-plugin" in portinfer.backends.names()
    entry = registry.entry("good-plugin")
    assert entry.origin == "entry point (good_plugin)"
    backend = portinfer.backends.get("good-plugin")
    assert backend.name == "good-plugin"
    results = portinfer.check("good-plugin", ops=["rms_norm", "attention"], dtypes=["fp32", "bf16"], seed=3)
    assert results.passed, results.table()


def test_plugin_for_another_protocol_version_is_refused_naming_both(plugins):
    ok, reason = registry.entry("old-plugin").status()
    assert not ok
    assert f"protocol version {PROTOCOL_VERSION + 1}" in reason and f"protocol version {PROTOCOL_VERSION}" in reason
    with pytest.raises(portinfer.backends.BackendUnavailable, match=f"version {PROTOCOL_VERSION + 1}"):
        portinfer.backends.get("old-plugin")


def test_backends_cli_json_lists_plugins_and_support(plugins, capsys):
    assert cli.main(["backends", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["good-plugin"]["available"] and rows["good-plugin"]["protocol_version"] == PROTOCOL_VERSION
    assert rows["torch"]["ops"]["attention"] == ["fp32", "fp16", "bf16"]
    assert not rows["old-plugin"]["available"] and "protocol version" in rows["old-plugin"]["reason"]


def test_a_plugin_cannot_shadow_a_builtin(tmp_path, monkeypatch):
    _install_plugin(tmp_path, "evil_plugin", "torch", "evil_plugin_mod", PROTOCOL_VERSION)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    try:
        assert registry.entry("torch").origin == "builtin"
    finally:
        monkeypatch.undo()
        registry.refresh()

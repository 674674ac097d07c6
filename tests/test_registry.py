import dataclasses
import sys
import textwrap

import pytest

from compactmind import registry
from compactmind.cli import main
from compactmind.errors import RegistryError
from compactmind.registry import Kind, Method, all_methods, get_method, register_method
from compactmind.space import Categorical, Float, Int


def test_builtin_methods_are_registered_with_matching_spaces():
    methods = all_methods()
    assert {"random_pruning", "l2_pruning", "fp16", "int8_sq"} <= set(methods)
    for name, m in methods.items():
        assert m.name == name
        assert isinstance(m.kind, Kind)
        assert list(m.space) == [f.name for f in dataclasses.fields(m.Params)]
        assert m.grid_size() == len(m.grid())


def test_duplicate_name_is_refused():
    with pytest.raises(RegistryError, match="already registered"):
        @register_method("fp16")
        class Again(Method):
            kind = Kind.QUANTIZATION

            @dataclasses.dataclass(frozen=True)
            class Params:
                pass

            space = {}


def test_space_must_match_parameters():
    with pytest.raises(RegistryError, match="must equal its parameters"):
        @register_method("mismatch_test")
        class Bad(Method):
            kind = Kind.PRUNING

            @dataclasses.dataclass(frozen=True)
            class Params:
                sparsity: float = 0.0

            space = {"amount": Float(0.1, 0.2, step=0.1)}
    assert "mismatch_test" not in all_methods()


def test_kind_and_base_class_are_required():
    with pytest.raises(RegistryError, match="kind"):
        @register_method("no_kind_test")
        class NoKind(Method):
            @dataclasses.dataclass(frozen=True)
            class Params:
                pass

            space = {}
    with pytest.raises(RegistryError, match="subclass"):
        register_method("not_a_method")(object)


def test_specs_enumerate_their_grids():
    assert Float(0.1, 0.5, step=0.1).grid() == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert Int(2, 8, step=2).grid() == [2, 4, 6, 8]
    assert Categorical(["a", "b"]).grid() == ["a", "b"]
    with pytest.raises(RegistryError):
        Float(0.1, 0.5, step=0.15)


def test_unknown_method_lists_known_ones():
    with pytest.raises(RegistryError, match="known methods: .*fp16"):
        get_method("nope")


def test_entry_point_plugin_registers_a_method(tmp_path, monkeypatch):
    pkg = tmp_path / "cm_plugin_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from compactmind import Categorical, Kind, Method, register_method

        @register_method("plugin_prune")
        class PluginPrune(Method):
            kind = Kind.PRUNING

            @dataclass(frozen=True)
            class Params:
                level: str = "low"

            space = {"level": Categorical(["low", "high"])}

            def apply_(self, model, params, calib, seed):
                pass
    '''))
    dist = tmp_path / "cm_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cm-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[compactmind.methods]\nplugin_prune = cm_plugin_demo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    try:
        methods = all_methods()
        assert "plugin_prune" in methods
        assert methods["plugin_prune"].grid_size() == 2
    finally:
        registry._REGISTRY.pop("plugin_prune", None)
        sys.modules.pop("cm_plugin_demo", None)


def test_methods_command_lists_name_kind_grid_parameters_and_what_each_does(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("l2_pruning"))
    assert line.split()[1:3] == ["pruning", str(get_method("l2_pruning").grid_size())] and "sparsity" in line
    assert line.endswith(get_method("l2_pruning").summary)
    assert all(m.summary for m in all_methods().values())  # every method says what it does

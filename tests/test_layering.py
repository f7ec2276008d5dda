"""Imports point down the data flow: the contracts in pyproject.toml ([tool.importlinter]),
checked with import-linter on the package's real import graph."""

from pathlib import Path

import importlinter.cli as importlinter_cli  # a test extra: the contract must run, never skip

ROOT = Path(__file__).resolve().parents[1]


def lint(config: Path) -> int:
    return importlinter_cli.lint_imports(config_filename=str(config), no_cache=True)


def test_the_import_contracts_hold(capsys):
    code = lint(ROOT / "pyproject.toml")
    out = capsys.readouterr().out
    assert code == 0, out  # the report names each broken contract and the import chain
    assert "0 broken" in out, out


def test_the_linter_sees_a_violation(tmp_path, capsys):
    # The same tool on a contract the code breaks (the trainer imports the model): if the
    # contract check above could not fail, neither would this.
    config = tmp_path / "reversed.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "triaxis"\n\n'
        '[[tool.importlinter.contracts]]\nname = "model above train"\n'
        'type = "layers"\nlayers = ["triaxis.model", "triaxis.train"]\n'
    )
    assert lint(config) == 1
    out = capsys.readouterr().out
    assert "BROKEN" in out and "triaxis.train" in out, out

"""The `tghmoe` command as a user meets it."""

import subprocess
import sys

from napari_tghmoe.cli import build_parser, main


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: tghmoe" in capsys.readouterr().out


def test_console_script_runs_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "napari_tghmoe.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "tghmoe" in result.stdout


def test_importing_the_package_does_not_import_torch_or_qt():
    code = (
        "import sys, napari_tghmoe, napari_tghmoe.io, napari_tghmoe.model, napari_tghmoe.cli;"
        "heavy = [m for m in ('torch', 'transformers', 'PyQt6', 'qtpy') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_parser_builds():
    assert build_parser().prog == "tghmoe"

"""`hydra-edge ui` refuses unsafe or malformed options with one line and exit code 2, before it
imports gradio or binds a port."""

from __future__ import annotations

import subprocess
import sys

import pytest
from uihelpers import hydra_edge

from hydra_edge.cli.hosts import is_loopback
from hydra_edge.errors import UserError
from hydra_edge.ui.cli import check_options, parse_auth


def test_non_loopback_host_without_auth_exits_2_with_one_clear_line(tmp_path):
    result = hydra_edge("ui", "--host", "0.0.0.0", "--workspace", str(tmp_path / "ws"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hydra-edge: error: --host 0.0.0.0")
    assert "--auth USER:PASS" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ws").exists(), "nothing is created before the options are accepted"


@pytest.mark.parametrize("auth", ["nocolon", ":secret", "user:", ""])
def test_malformed_auth_exits_2(tmp_path, auth):
    result = hydra_edge("ui", "--auth", auth, "--workspace", str(tmp_path / "ws"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "hydra-edge: error: --auth: use USER:PASS (both non-empty, separated by ':')"
    ]


def test_workspace_that_is_a_file_exits_2(tmp_path):
    (tmp_path / "file").write_text("x")
    result = hydra_edge("ui", "--workspace", str(tmp_path / "file"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "--workspace" in result.stderr and "not a folder" in result.stderr


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "host, auth, ok",
    [
        ("127.0.0.1", None, True),
        ("0.0.0.0", "admin:pw", True),
        ("192.168.1.20", "admin:a:b", True),  # the password may contain ':'
        ("0.0.0.0", None, False),
        ("192.168.1.20", None, False),
        ("127.0.0.1", "admin", False),
    ],
)
def test_check_options(host, auth, ok):
    if ok:
        check_options(host, 7860, auth, 50)
    else:
        with pytest.raises(UserError):
            check_options(host, 7860, auth, 50)


def test_parse_auth_splits_at_the_first_colon():
    assert parse_auth("admin:a:b") == ("admin", "a:b")


@pytest.mark.parametrize("port, upload_mb", [(0, 50), (70000, 50), (7860, 0), (7860, -1)])
def test_bad_port_or_upload_limit(port, upload_mb):
    with pytest.raises(UserError):
        check_options("127.0.0.1", port, None, upload_mb)


def test_registering_the_command_does_not_import_gradio():
    """`hydra-edge --help` must stay fast: the ui command imports gradio only when it runs."""
    code = (
        "import sys; from hydra_edge.cli.app import _register_plugins, app; _register_plugins(); "
        "names = [c.name for c in app.registered_commands]; "
        "print('ui' in names, 'gradio' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "False"], out.stderr

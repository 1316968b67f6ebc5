"""`make install` and `make uninstall` into a temporary DESTDIR."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

# Dependencies come from the test's own environment: a test makes no network traffic.
OFFLINE = ["INSTALL_DEPS=no", f"INSTALL_PYTHON={sys.executable}"]


def make(target: str, destdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), target, f"DESTDIR={destdir}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def files(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def expected_files(prefix: str) -> set[str]:
    modules = {
        f"{prefix}/lib/chatd/chatd/{p.relative_to(ROOT / 'chatd')}"
        for p in (ROOT / "chatd").rglob("*.py")
    }
    commands = {f"{prefix}/bin/{name}" for name in ("chatd", "chatctl", "chat") if has_script(name)}
    pages = {
        f"{prefix}/share/man/man{p.suffix[1:]}/{p.name}" for p in (ROOT / "man").glob("*.[1-8]")
    }
    return (
        modules
        | commands
        | pages
        | {
            "etc/chatd/chatd.yaml",
            f"{prefix}/lib/systemd/system/chatd.service",
            f"{prefix}/lib/systemd/system/chatd.socket",
            f"{prefix}/lib/sysusers.d/chatd.conf",
        }
    )


def has_script(name: str) -> bool:
    return f"\n{name} = " in (ROOT / "pyproject.toml").read_text()


def test_install_puts_everything_in_place(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    make("install", dest, *OFFLINE)
    assert files(dest) == expected_files("usr/local")
    assert (dest / "etc/chatd/chatd.yaml").read_text() == (ROOT / "etc/chatd.yaml").read_text()
    service = (dest / "usr/local/lib/systemd/system/chatd.service").read_text()
    assert "ExecStart=/usr/local/bin/chatd --config /etc/chatd/chatd.yaml\n" in service
    assert "@" + "BINDIR@" not in service
    # Nothing installed mentions the staging directory (the byte code neither).
    for path in dest.rglob("*"):
        if path.is_file():
            assert str(dest).encode() not in path.read_bytes(), path
    assert (dest / "usr/local/lib/chatd/chatd/__pycache__").is_dir()


def test_installed_command_runs_the_installed_package(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    make("install", dest, *OFFLINE)
    wrapper = (dest / "usr/local/bin/chatd").read_text()
    assert wrapper.startswith(f"#!{sys.executable} -I\n")
    assert 'sys.path.insert(0, "/usr/local/lib/chatd")' in wrapper
    # Run it as if DESTDIR were /: point the wrapper at the staged package.
    staged = tmp_path / "chatd-staged"
    staged.write_text(wrapper.replace('"/usr/local/lib/chatd"', f'"{dest}/usr/local/lib/chatd"'))
    config = dest / "etc/chatd/chatd.yaml"
    r = subprocess.run(
        [sys.executable, "-I", str(staged), "--check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"chatd: {config}: configuration is valid\n"
    probe = "import sys; sys.path.insert(0, sys.argv[1]); import chatd; print(chatd.__file__)"
    where = subprocess.run(
        [sys.executable, "-I", "-c", probe, f"{dest}/usr/local/lib/chatd"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    ).stdout.strip()
    assert where == f"{dest}/usr/local/lib/chatd/chatd/__init__.py"


def test_prefix_moves_everything_but_the_config(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    make("install", dest, "PREFIX=/usr", *OFFLINE)
    assert files(dest) == expected_files("usr")
    service = (dest / "usr/lib/systemd/system/chatd.service").read_text()
    assert "ExecStart=/usr/bin/chatd --config" in service


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or os.geteuid() != 0,
    reason="needs systemd-sysusers and root",
)
def test_installed_sysusers_file_creates_the_admin_group(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    r = make("install", dest, *OFFLINE)
    assert "systemd-sysusers" not in r.stdout  # not with DESTDIR: the package's job
    assert not (dest / "etc/group").exists()
    conf = dest / "usr/local/lib/sysusers.d/chatd.conf"
    # What systemd-sysusers would do with it on that system.
    r2 = subprocess.run(
        ["systemd-sysusers", f"--root={dest}", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r2.returncode == 0, r2.stderr
    groups = [line.split(":") for line in (dest / "etc/group").read_text().splitlines()]
    assert [(g[0], 0 < int(g[2]) < 1000) for g in groups] == [("chatd-admin", True)]


def test_install_never_overwrites_the_config_and_uninstall_keeps_a_changed_one(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "root"
    make("install", dest, *OFFLINE)
    config = dest / "etc/chatd/chatd.yaml"
    config.write_text("max_clients: 50\n")
    r = make("install", dest, *OFFLINE)
    assert "kept the existing /etc/chatd/chatd.yaml" in r.stdout
    assert config.read_text() == "max_clients: 50\n"

    r = make("uninstall", dest, *OFFLINE)
    assert "kept /etc/chatd/chatd.yaml: it was changed" in r.stdout
    assert files(dest) == {"etc/chatd/chatd.yaml"}


def test_uninstall_removes_what_install_put_there(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    make("install", dest, *OFFLINE)
    make("uninstall", dest, *OFFLINE)
    assert files(dest) == set()
    assert not (dest / "etc/chatd").exists()
    assert not (dest / "usr/local/lib/chatd").exists()

"""The systemd unit files: systemd-analyze verifies them and rates their exposure."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from chatd.server.config import Config

UNITS = ROOT / "systemd"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (package systemd)",
)


def directives(unit: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, values in order of appearance."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def installed_units(tmp_path: Path) -> tuple[Path, Path]:
    """The units as `make install` writes them, @BINDIR@ pointing at this chatd."""
    bindir = Path(sys.executable).parent
    assert (bindir / "chatd").exists(), "chatd is not installed in the test's environment"
    out = []
    for name in ("chatd.service", "chatd.socket"):
        text = (UNITS / name).read_text().replace("@BINDIR@", str(bindir))
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out[0], out[1]


@needs_analyze
def test_units_verify_clean(tmp_path: Path) -> None:
    service, socket_unit = installed_units(tmp_path)
    # Documentation= is checked too, against the pages as installed, where man exists.
    manpath = tmp_path / "man"
    for page in (ROOT / "man").glob("*.[1-8]"):
        section = manpath / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section)
    check_man = [] if shutil.which("man") else ["--man=no"]
    r = subprocess.run(
        ["systemd-analyze", "verify", *check_man, str(service), str(socket_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MANPATH": str(manpath)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == r.stderr == "", r


@needs_analyze
def test_service_exposure_is_at_most_two(tmp_path: Path) -> None:
    service, _ = installed_units(tmp_path)
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in r.stderr and "unrecognized" in r.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    m = re.search(r"Overall exposure level for chatd\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


def test_service_declares_what_chatd_relies_on() -> None:
    d = directives(UNITS / "chatd.service")
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == ["@BINDIR@/chatd --config /etc/chatd/chatd.yaml"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["DynamicUser"] == ["yes"]
    assert d["RuntimeDirectory"] == ["chatd"]  # the control socket's directory
    assert d["StateDirectory"] == ["chatd"]
    assert int(d["LimitNOFILE"][0]) > 10_000
    assert d["Restart"] == ["on-failure"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    # ~@resources takes setrlimit(): refuse it with EPERM (chatd copes), never kill.
    assert d["SystemCallErrorNumber"] == ["EPERM"]
    # The admin group's members get in: the control socket is born with chatd's
    # group (chown() is in ~@privileged), and chatd sees their own uids and
    # gids (PrivateUsers= would map them to nobody).
    assert d["Group"] == ["chatd-admin"]
    assert "PrivateUsers" not in d


def test_sysusers_creates_the_group_the_unit_and_the_config_name() -> None:
    lines = [
        line.split()
        for line in (UNITS / "chatd.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines == [["g", "chatd-admin", "-"]]
    config = yaml.safe_load((ROOT / "etc/chatd.yaml").read_text())
    assert config["control"]["admin_group"] == "chatd-admin"
    assert Config().control.admin_group == "chatd-admin"


def test_socket_names_its_descriptor() -> None:
    d = directives(UNITS / "chatd.socket")
    assert d["ListenStream"] == ["127.0.0.1:1234"]  # the default config's address
    assert d["FileDescriptorName"] == ["chat"]

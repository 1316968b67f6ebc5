"""Config loading and its errors, and `chatd --check-config`."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, Client

from chatd.server import config
from chatd.server.config import Address, ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "chatd.yaml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, text))
    return str(e.value)


def test_shipped_config_is_the_defaults() -> None:
    assert config.load(ROOT / "etc" / "chatd.yaml") == config.defaults()


def test_shipped_config_documents_every_key() -> None:
    text = (ROOT / "etc" / "chatd.yaml").read_text()
    shipped = yaml.safe_load(text)
    for key in config.documented_keys():
        node = shipped
        for part in key.split("."):
            assert part in node, f"etc/chatd.yaml lacks {key}"
            node = node[part]


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "")) == config.defaults()
    # A section whose keys are all commented out is empty (null): its defaults.
    assert config.load(write(tmp_path, "flood:\ncontrol:\n")) == config.defaults()


def test_check_config_refuses_a_section_turned_off(tmp_path: Path) -> None:
    # `flood: off` does not turn flood control off (rate: 0 does): it is refused, not ignored.
    p = write(tmp_path, "flood: off\n")
    r = run_chatd("--check-config", "--config", str(p))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == f"chatd: error: {p}: flood: expected a mapping of settings, got False\n"


def test_listen_forms(tmp_path: Path) -> None:
    cfg = config.load(
        write(tmp_path, 'listen: ["0.0.0.0:1", "[::1]:2", {host: "::", port: 3}, "localhost:4"]')
    )
    assert cfg.listen == (
        Address("0.0.0.0", 1),
        Address("::1", 2),
        Address("::", 3),
        Address("localhost", 4),
    )
    assert str(cfg.listen[1]) == "[::1]:2"
    one = config.load(write(tmp_path, 'listen: "[::]:5"'))  # one address needs no list
    assert one.listen == (Address("::", 5),)


def test_listen_from_the_command_line_replaces_the_config_and_holds_over_reloads(
    start: Any,
) -> None:
    d = start(args=["--listen", "127.0.0.1:0", "--listen", "127.0.0.2:0"])
    assert [a.rsplit(":", 1)[0] for a in d.listen] == ["127.0.0.1", "127.0.0.2"]
    d.signal(signal.SIGHUP)
    reload = d.wait_for("reload")
    assert reload["needs_restart"] == [] and reload["applied"] == []
    c = Client(int(d.listen[1].rsplit(":", 1)[1]), host="127.0.0.2")
    c.join("alice")


def test_a_bad_listen_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    r = run_chatd("--check-config", "--listen", ":5")
    assert r.returncode == 2
    assert r.stderr == (
        'chatd: error: command line: listen: [0]: expected a host ("0.0.0.0" or "::" for '
        "every interface), got ':5'\n"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port: 1", "F: port: unknown setting (known here: listen, "),
        ("log: {colour: red}", "F: log.colour: unknown setting (known here: format, level"),
        ("header_length: abc", "F: header_length: expected an integer 1-20, got 'abc'"),
        ("header_length: true", "F: header_length: expected an integer 1-20, got True"),
        ("header_length: 0", "F: header_length: expected an integer 1-20, got 0"),
        ("max_message_bytes: 4096.5", "F: max_message_bytes: expected an integer"),
        ("handshake_timeout: -1", "F: handshake_timeout: expected seconds from 0.1 to 3600"),
        ("handshake_timeout: .nan", "F: handshake_timeout: expected seconds"),
        ("shutdown_grace: yes", "F: shutdown_grace: expected seconds from 0 to 60, got True"),
        ("log: {format: xml}", "F: log.format: expected one of auto, json, console, got 'xml'"),
        ("log: {level: loud}", "F: log.level: expected one of debug, info, warning, error"),
        ("log: {messages: 1}", "F: log.messages: expected true or false, got 1"),
        ("log: [1]", "F: log: expected a mapping of settings, got [1]"),
        (
            "control: {mode: 0660}",
            'F: control.mode: expected an octal mode as a quoted string such as "0660", got 432 '
            "(YAML reads an unquoted 0660 as the number 432: put the mode in quotes)",
        ),
        ("control: {mode: '0668'}", 'F: control.mode: expected an octal mode such as "0660"'),
        ("control: {mode: rw}", 'F: control.mode: expected an octal mode such as "0660"'),
        ("control: {socket: 5}", 'F: control.socket: expected an absolute path or "", got 5'),
        ("control: {socket: a.sock}", "F: control.socket: expected an absolute path"),
        (f"control: {{socket: /{'x' * 107}}}", "F: control.socket: expected a socket path of at"),
        ("control: {admin_group: 'a b'}", "F: control.admin_group: expected a group name"),
        ("state_file: ''", "F: state_file: expected an absolute path, got ''"),
        ("state_file: s.json", "F: state_file: expected an absolute path or \"\", got 's.json'"),
        ("listen: 1234", "F: listen: expected a non-empty list of HOST:PORT addresses"),
        ("listen: []", "F: listen: expected a non-empty list"),
        ("listen: ['1.2.3.4']", "F: listen: [0]: expected HOST:PORT, got '1.2.3.4'"),
        ("listen: ['1.2.3.4:70000']", "F: listen: [0]: expected an integer 0-65535, got 70000"),
        ("listen: ['bad host!:1']", "F: listen: [0]: expected an IP address or host name"),
        ("listen: [{port: 1, hots: x}]", "F: listen: [0]: expected keys host and port"),
        # Every interface is said so, never implied.
        ("listen: [{port: 1}]", "F: listen: [0]: expected keys host and port, got {'port': 1}"),
        ("listen: [':1']", 'F: listen: [0]: expected a host ("0.0.0.0" or "::" for every'),
        ("listen: ['[]:1']", 'F: listen: [0]: expected a host ("0.0.0.0" or "::" for'),
        ("listen: ['0:1']", "F: listen: [0]: expected an IP address or host name, got '0'"),
        ("listen: [{host: '', port: 1}]", 'F: listen: [0]: expected a host ("0.0.0.0" or'),
        ("metrics: {listen: 9464}", "F: metrics.listen: expected HOST:PORT, got 9464"),
        ("metrics: {listen: [':9464']}", "F: metrics.listen: expected HOST:PORT, got [':9464']"),
        ("metrics: {listen: ':9464'}", 'F: metrics.listen: expected a host ("0.0.0.0" or "::"'),
        ("metrics: {listen: 'localhost'}", "F: metrics.listen: expected HOST:PORT, got 'local"),
        ("metrics: {listen: '1.2.3.4:65536'}", "F: metrics.listen: expected an integer 0-65535"),
        ("metrics: {port: 9464}", "F: metrics.port: unknown setting (known here: listen)"),
        ("metrics: yes", "F: metrics: expected a mapping of settings, got True"),
        ("[1, 2]", "F: expected a mapping of settings, got [1, 2]"),
        (
            "header_length: 3\nmax_message_bytes: 1000",
            "F: max_message_bytes: 1000 does not fit a 3-byte header (at most 999)",
        ),
        ("listen: [\n", "F: line 2: invalid YAML"),
        ("max_per_address: -1", "F: max_per_address: expected an integer 0-1000000, got -1"),
        (
            "idle_timeout: yes",
            "F: idle_timeout: expected seconds from 0.1 to 604800 (0 for off), got True",
        ),
        ("flood: 5", "F: flood: expected a mapping of settings, got 5"),
        # A section that is false, zero or empty is not a mapping either (YAML reads off as false).
        ("flood: off", "F: flood: expected a mapping of settings, got False"),
        ("control: []", "F: control: expected a mapping of settings, got []"),
        ("log: 0", "F: log: expected a mapping of settings, got 0"),
        ("flood: {rate: fast}", "F: flood.rate: expected messages per second (0 for off) from 0"),
        ("flood: {rate: -1}", "F: flood.rate: expected messages per second (0 for off) from 0"),
        ("flood: {burst: 0}", "F: flood.burst: expected an integer 1-1000000, got 0"),
        ("flood: {max_dropped: 1.5}", "F: flood.max_dropped: expected an integer 0-1000000000"),
        ("flood: {exempt: 10.0.0.1}", "F: flood.exempt: expected a list of IP addresses or"),
        (
            "flood: {exempt: [10.0.0.0/8, lan]}",
            "F: flood.exempt: [1]: expected an IP address or network such as 10.0.0.0/8, got 'lan'",
        ),
    ],
)
def test_errors_name_file_key_and_problem(tmp_path: Path, text: str, message: str) -> None:
    got = error_of(tmp_path, text).replace(str(tmp_path / "chatd.yaml"), "F")
    assert got.startswith(message), got
    assert "\n" not in got


def test_flood_section(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path, "flood: {rate: 2.5, burst: 4, exempt: ['10.1.2.3', '192.168.0.0/16', '::1']}"
        )
    )
    assert cfg.flood.rate == 2.5 and cfg.flood.burst == 4
    assert cfg.flood.max_dropped == config.defaults().flood.max_dropped
    assert [str(n) for n in cfg.flood.exempt] == ["10.1.2.3/32", "192.168.0.0/16", "::1/128"]
    assert config.defaults().flood.exempt == ()


def test_metrics_listen_is_off_by_default_and_one_address_with_its_host(tmp_path: Path) -> None:
    assert config.defaults().metrics.listen is None
    assert config.load(write(tmp_path, "metrics: {listen: ''}")).metrics.listen is None
    cfg = config.load(write(tmp_path, "metrics:\n  listen: 127.0.0.1:9464\n"))
    assert cfg.metrics.listen == Address("127.0.0.1", 9464)
    cfg = config.load(write(tmp_path, "metrics: {listen: '[::1]:0'}"))
    assert cfg.metrics.listen == Address("::1", 0)
    cfg = config.load(write(tmp_path, "metrics: {listen: {host: 0.0.0.0, port: 9464}}"))
    assert str(cfg.metrics.listen) == "0.0.0.0:9464"
    applied, restart = config.defaults().diff(cfg)
    assert (applied, restart) == ([], ["metrics.listen"])  # a new listener needs a restart
    assert config.defaults().merged_for_reload(cfg).metrics.listen is None


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml: no such file$"):
        config.load(tmp_path / "nope.yaml")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(b"log: {format: \xff}")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(p)


def test_diff_and_merge_for_reload() -> None:
    old = config.defaults()
    new = config.build(
        {"listen": ["127.0.0.1:9"], "max_message_bytes": 10, "log": {"level": "debug"}}, "x"
    )
    applied, restart = old.diff(new)
    assert applied == ["max_message_bytes", "log.level"]
    assert restart == ["listen"]
    merged = old.merged_for_reload(new)
    assert merged.listen == old.listen
    assert merged.max_message_bytes == 10 and merged.log.level == "debug"


def run_chatd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatd", *args], capture_output=True, text=True, timeout=30
    )


def test_check_config_valid() -> None:
    r = run_chatd("--check-config", "--config", str(ROOT / "etc" / "chatd.yaml"))
    assert r.returncode == 0
    assert r.stdout.strip().endswith("etc/chatd.yaml: configuration is valid")


def test_check_config_invalid_is_one_line_and_exit_2(tmp_path: Path) -> None:
    p = write(tmp_path, "max_clients: many\n")
    r = run_chatd("--check-config", "--config", str(p))
    assert r.returncode == 2
    assert (
        r.stderr == f"chatd: error: {p}: max_clients: expected an integer 1-1000000, got 'many'\n"
    )


def test_startup_with_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    r = run_chatd("--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2
    assert r.stderr == f"chatd: error: {tmp_path / 'missing.yaml'}: no such file\n"
    assert r.stdout == ""


def test_usage_error_is_exit_2() -> None:
    r = run_chatd("--bogus")
    assert r.returncode == 2
    assert "unrecognized arguments: --bogus" in r.stderr


def test_control_modes_and_overrides(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "control: {mode: '600', socket: ''}"))
    assert cfg.control.mode == 0o600 and cfg.control.socket == ""
    cfg = config.override(cfg, {"control.socket": "/x/a.sock", "state_file": "/s.json"}, "cli")
    assert (cfg.control.socket, cfg.state_file) == ("/x/a.sock", "/s.json")
    with pytest.raises(ConfigError, match=r"^cli: state_file: expected an absolute path, got ''$"):
        config.override(cfg, {"state_file": ""}, "cli")


DUPLICATED = """\
flood:
  rate: 5
max_clients: 10
flood:            # an override block appended to the sample
  burst: 3
"""


def test_a_key_given_twice_is_an_error_with_its_line(tmp_path: Path) -> None:
    p = write(tmp_path, DUPLICATED)
    r = run_chatd("--check-config", "--config", str(p))
    assert (r.returncode, r.stderr) == (2, f"chatd: error: {p}:4: duplicate key 'flood'\n")
    r = run_chatd("--config", str(p))  # and at start
    assert (r.returncode, r.stderr) == (2, f"chatd: error: {p}:4: duplicate key 'flood'\n")
    nested = write(tmp_path, "log:\n  level: info\n  format: json\n  level: debug\n")
    with pytest.raises(ConfigError, match=r":4: duplicate key 'level'"):
        config.load(nested)
    assert config.load(write(tmp_path, "flood: {rate: 5}\nlog: {level: info}\n")).flood.rate == 5

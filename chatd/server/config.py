"""Configuration: YAML in, a frozen, validated `Config` out.

Every setting is declared once, below, as a dataclass field carrying its
default, its check and whether a reload can change it.  `load()` walks the
YAML against those declarations, so an unknown key, a wrong type or an
out-of-range value is reported as ``FILE: KEY: WHAT`` before anything uses
the config.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chatd.core.addresses import IPNetwork, parse_network
from chatd.wire.framing import max_length

DEFAULT_PATH = Path("/etc/chatd/chatd.yaml")


class ConfigError(Exception):
    """A config that cannot be used.  str() is the one-line message."""

    def __init__(self, source: str, key: str, what: str) -> None:
        super().__init__(f"{source}: {key}: {what}" if key else f"{source}: {what}")
        self.source = source
        self.key = key
        self.what = what


Check = Callable[[Any], Any]  # returns the (normalised) value or raises ValueError


def setting(default: Any, check: Check, doc: str, *, reload: bool = True) -> Any:
    """Declare a setting: its default, its check, its doc and whether reload applies it."""
    meta = {"check": check, "doc": doc, "reload": reload}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    """Declare a nested section of settings."""
    return field(default_factory=cls, metadata={"doc": doc, "section": cls})


# Checks.  Each takes the YAML value and returns the value to use, or raises
# ValueError with "expected ..., got ..." so the error names what is wanted.


def _got(value: Any) -> str:
    return f"got {value!r}"


def integer(lo: int, hi: int) -> Check:
    def check(value: Any) -> int:
        # YAML booleans are ints to Python: `port: yes` must not become 1.
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"expected an integer {lo}-{hi}, {_got(value)}")
        return value

    return check


def seconds(lo: float, hi: float, *, zero_is_off: bool = False) -> Check:
    def check(value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and zero_is_off and value == 0:
            return 0.0
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            off = " (0 for off)" if zero_is_off else ""
            raise ValueError(f"expected seconds from {lo:g} to {hi:g}{off}, {_got(value)}")
        return float(value)

    return check


def number(lo: float, hi: float, *, what: str) -> Check:
    def check(value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"expected {what} from {lo:g} to {hi:g}, {_got(value)}")
        return float(value)

    return check


def networks(value: Any) -> tuple[Network, ...]:
    """A list of IP addresses or networks ("10.0.0.0/8", "::1")."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of IP addresses or networks, {_got(value)}")
    parsed = []
    for i, item in enumerate(value):
        net = parse_network(item) if isinstance(item, str) else None
        if net is None:
            raise ValueError(
                f"[{i}]: expected an IP address or network such as 10.0.0.0/8, {_got(item)}"
            )
        parsed.append(net)
    return tuple(parsed)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, {_got(value)}")
    return value


def choice(*options: str) -> Check:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, {_got(value)}")
        return str(value)

    return check


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, {_got(value)}")
    return value


def absolute_path_or_empty(value: Any) -> str:
    if not isinstance(value, str) or (value and not value.startswith("/")):
        raise ValueError(f'expected an absolute path or "", {_got(value)}')
    return value


def file_mode(value: Any) -> int:
    """A permission mode given as a quoted octal string such as "0660"."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(
            f'expected an octal mode as a quoted string such as "0660", got {value!r} '
            "(YAML reads an unquoted 0660 as the number 432: put the mode in quotes)"
        )
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError(f'expected an octal mode such as "0660", {_got(value)}')
    return int(value, 8)


def socket_path(value: Any) -> str:
    """An absolute Unix-domain socket path ("" for none); the kernel takes 107 bytes."""
    path = absolute_path_or_empty(value)
    if len(os.fsencode(path)) > 107 or "\0" in path:
        raise ValueError(f"expected a socket path of at most 107 bytes, {_got(value)}")
    return path


def file_path(value: Any) -> str:
    path = absolute_path_or_empty(value)
    if not path or "\0" in path:
        raise ValueError(f"expected an absolute path, {_got(value)}")
    return path


def group_name(value: Any) -> str:
    name = text(value)
    if name and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?", name):
        raise ValueError(f"expected a group name, {_got(value)}")
    return name


def addresses(value: Any) -> tuple[Address, ...]:
    """A list of addresses, or one alone."""
    if isinstance(value, str | Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of HOST:PORT addresses, {_got(value)}")
    parsed = []
    for i, item in enumerate(value):
        try:
            parsed.append(Address.parse(item))
        except ValueError as e:
            raise ValueError(f"[{i}]: {e}") from None
    return tuple(parsed)


def address_or_off(value: Any) -> Address | None:
    """One address, or "" for none."""
    if value == "":
        return None
    return Address.parse(value)


Network = IPNetwork


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, item: Any) -> Address:
        """Take "HOST:PORT", "[V6]:PORT" or {host: HOST, port: PORT}.

        The host is never implied: every interface is "0.0.0.0" or "::", said so.
        """
        if isinstance(item, Mapping):
            if set(item) != {"host", "port"}:
                raise ValueError(f"expected keys host and port, {_got(dict(item))}")
            host, port = item["host"], item["port"]
        elif isinstance(item, str):
            host, sep, port_text = item.rpartition(":")
            if not sep or not port_text.isdigit():
                raise ValueError(f"expected HOST:PORT, {_got(item)}")
            host, port = host.removeprefix("[").removesuffix("]"), int(port_text)
        else:
            raise ValueError(f"expected HOST:PORT, {_got(item)}")
        host = text(host)
        port = integer(0, 65535)(port)
        if not host:
            raise ValueError(
                f'expected a host ("0.0.0.0" or "::" for every interface), {_got(item)}'
            )
        if not _is_host(host):
            raise ValueError(f"expected an IP address or host name, {_got(host)}")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        labels = host.rstrip(".").split(".")
        # All digits ("0", "10.1"): an address written short, which getaddrinfo would
        # take (as 0.0.0.0, 10.0.0.1), not a name.
        return not all(lbl.isdigit() for lbl in labels) and all(
            lbl and len(lbl) < 64 and lbl.replace("-", "").isalnum() and lbl.isascii()
            for lbl in labels
        )


@dataclass(frozen=True)
class LogConfig:
    format: str = setting(
        "auto",
        choice("auto", "json", "console"),
        "json: one JSON object per line; console: readable; auto: console on a terminal, else json",
    )
    level: str = setting(
        "info",
        choice("debug", "info", "warning", "error"),
        "the least severe event written",
    )
    messages: bool = setting(
        True, boolean, "whether message events include the text (false keeps only the size)"
    )
    file: str = setting(
        "",
        absolute_path_or_empty,
        'absolute path of a file to append events to instead of stdout ("" for stdout); '
        "reopened on every reload, so logrotate can move it and send SIGHUP",
    )


@dataclass(frozen=True)
class FloodConfig:
    rate: float = setting(
        10.0,
        number(0, 1_000_000, what="messages per second (0 for off)"),
        "messages per second one user may send over time; 0 turns flood control off",
    )
    burst: int = setting(
        50, integer(1, 1_000_000), "messages one user may send at once before the rate applies"
    )
    max_dropped: int = setting(
        200,
        integer(0, 1_000_000_000),
        "messages dropped in one flood before the sender is disconnected (0: never)",
    )
    exempt: tuple[Network, ...] = setting(
        [], networks, "IP addresses or networks whose users flood control never limits"
    )


def user_name(value: Any) -> str:
    name = text(value)
    if name and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?", name):
        raise ValueError(f"expected a user name, {_got(value)}")
    return name


@dataclass(frozen=True)
class DaemonConfig:
    user: str = setting(
        "",
        user_name,
        "with --daemon, the user chatd serves as once it has bound its sockets (started "
        'as root); "": stay who started it',
        reload=False,
    )
    group: str = setting(
        "",
        group_name,
        'with --daemon and user, the group to serve as ("": the user\'s own)',
        reload=False,
    )


@dataclass(frozen=True)
class ControlConfig:
    socket: str = setting(
        "/run/chatd/admin.sock",
        socket_path,
        'the admin control socket chatctl talks to ("" for none); its directory is created '
        "if missing",
        reload=False,
    )
    mode: int = setting(
        "0660",
        file_mode,
        'permissions of the control socket, an octal string in quotes such as "0660"',
        reload=False,
    )
    admin_group: str = setting(
        "chatd-admin",
        group_name,
        "members of this group may use the control socket, besides root and chatd's own "
        'user ("" for none)',
    )


@dataclass(frozen=True)
class MetricsConfig:
    listen: Address | None = setting(  # noqa: RUF009
        "",
        address_or_off,
        'where to serve GET /metrics over HTTP for Prometheus, "HOST:PORT" or "[IPV6]:PORT" '
        '(such as "127.0.0.1:9464"; the host is never implied); "" for no listener',
        reload=False,
    )


@dataclass(frozen=True)
class HistoryConfig:
    replay_on_join: int = setting(
        20,
        integer(0, 100),
        "messages a newcomer is sent, after the welcome, of what was said before (0: none)",
    )
    file: str = setting(
        "/var/lib/chatd/history.sqlite3",
        absolute_path_or_empty,
        'the SQLite database that keeps the history across restarts ("" for memory only: '
        "the last 1000 messages, forgotten at exit); its directory is created if missing",
        reload=False,
    )
    keep_messages: int = setting(
        100_000,
        integer(0, 100_000_000),
        "messages kept at most, the oldest deleted first (0: no history at all)",
    )
    keep_days: float = setting(
        30,
        number(0, 36500, what="days (0 for no limit)"),
        "days a message is kept (0: no age limit)",
    )


MiB = 1024 * 1024


@dataclass(frozen=True)
class Config:
    listen: tuple[Address, ...] = setting(
        ["127.0.0.1:1234"],
        addresses,
        'addresses to listen on, "HOST:PORT" or "[IPV6]:PORT" (one, or a list); '
        '"0.0.0.0" or "::" for every interface, never implied; port 0 picks a free one',
        reload=False,
    )
    header_length: int = setting(
        10, integer(1, 20), "bytes in a frame header (10 in the classic protocol)", reload=False
    )
    max_message_bytes: int = setting(
        4096, integer(1, 16 * MiB), "largest message payload accepted, in bytes"
    )
    max_name_bytes: int = setting(32, integer(1, 1024), "longest user name accepted, in bytes")
    handshake_timeout: float = setting(
        10.0, seconds(0.1, 3600), "seconds a new connection has to send its name"
    )
    max_queue_bytes: int = setting(
        MiB,
        integer(4096, 1024 * MiB),
        "bytes queued for one client before it is dropped as a slow consumer",
    )
    max_clients: int = setting(10000, integer(1, 1_000_000), "connections served at once")
    max_per_address: int = setting(
        16,
        integer(0, 1_000_000),
        "connections served at once from one IP address, an IPv6 one counted as its /64 "
        "(0: no limit)",
    )
    max_handshakes: int = setting(
        512,
        integer(2, 1_000_000),
        "connections at once that have not sent a name; past half of it a new one is "
        "dropped at random, the likelier the fuller",
    )
    max_handshakes_per_address: int = setting(
        8,
        integer(1, 1_000_000),
        "connections at once from one IP address (or IPv6 /64) that have not sent a name",
    )
    address_exempt: tuple[Network, ...] = setting(
        [],
        networks,
        "IP addresses or networks that max_per_address and max_handshakes_per_address do "
        "not limit (a NAT'ed LAN, a bot)",
    )
    idle_timeout: float = setting(
        0.0,
        seconds(0.1, 7 * 86400, zero_is_off=True),
        "seconds a user may send nothing before being disconnected (0: never)",
    )
    shutdown_grace: float = setting(
        2.0, seconds(0, 60), "seconds to flush queued messages at shutdown"
    )
    flood: FloodConfig = section(FloodConfig, "flood control")  # noqa: RUF009
    log: LogConfig = section(LogConfig, "logging")  # noqa: RUF009
    control: ControlConfig = section(ControlConfig, "the admin control socket")  # noqa: RUF009
    daemon: DaemonConfig = section(DaemonConfig, "chatd --daemon")  # noqa: RUF009
    metrics: MetricsConfig = section(MetricsConfig, "the metrics for Prometheus")  # noqa: RUF009
    history: HistoryConfig = section(HistoryConfig, "what was said, kept")  # noqa: RUF009
    state_file: str = setting(
        "/var/lib/chatd/state.json",
        file_path,
        "where bans are kept across restarts (written atomically; its directory is created "
        "if missing)",
        reload=False,
    )

    def diff(self, new: Config) -> tuple[list[str], list[str]]:
        """Return the keys that differ, split into (applied by reload, needing restart)."""
        applied: list[str] = []
        restart: list[str] = []
        for key, old_value, new_value, reloadable in _walk_pairs(self, new, ""):
            if old_value != new_value:
                (applied if reloadable else restart).append(key)
        return applied, restart

    def merged_for_reload(self, new: Config) -> Config:
        """``new`` with every setting that needs a restart kept at its current value."""
        merged: Config = _merge(self, new)
        return merged


def _walk_pairs(old: Any, new: Any, prefix: str) -> Any:
    for f in dataclasses.fields(old):
        key = prefix + f.name
        if "section" in f.metadata:
            yield from _walk_pairs(getattr(old, f.name), getattr(new, f.name), key + ".")
        else:
            yield key, getattr(old, f.name), getattr(new, f.name), f.metadata["reload"]


def _merge(old: Any, new: Any) -> Any:
    changes = {}
    for f in dataclasses.fields(old):
        if "section" in f.metadata:
            changes[f.name] = _merge(getattr(old, f.name), getattr(new, f.name))
        elif not f.metadata["reload"]:
            changes[f.name] = getattr(old, f.name)
    return dataclasses.replace(new, **changes)


def defaults() -> Config:
    return build({}, "<defaults>")


def load(path: str | Path) -> Config:
    """Read and validate the YAML file at ``path``."""
    source = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_StrictLoader)  # a SafeLoader
    except FileNotFoundError:
        raise ConfigError(source, "", "no such file") from None
    except PermissionError:
        raise ConfigError(source, "", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(source, "", "is a directory, expected a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "", "is not UTF-8 text") from None
    except DuplicateKey as e:
        raise ConfigError(f"{source}:{e.line}", "", f"duplicate key {e.key!r}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(source, "", f"{where}invalid YAML: {problem}") from None
    return build({} if raw is None else raw, source)


class DuplicateKey(yaml.YAMLError):
    """A mapping names a key twice: YAML keeps the last silently, chatd refuses."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key
        self.line = line


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: the constructor says so
                break
            if duplicate:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def build(raw: Any, source: str) -> Config:
    """Validate a parsed YAML document against the declarations."""
    config: Config = _build(Config, raw, source, "")
    check(config, source)
    return config


def check(config: Config, source: str) -> None:
    """Checks that span settings; raises ConfigError."""
    hl_max = max_length(config.header_length)
    for key in ("max_message_bytes", "max_name_bytes"):
        if getattr(config, key) > hl_max:
            raise ConfigError(
                source,
                key,
                f"{getattr(config, key)} does not fit a {config.header_length}-byte header "
                f"(at most {hl_max})",
            )


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(
            source, prefix.rstrip("."), f"expected a mapping of settings, {_got(raw)}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(source, f"{prefix}{key}", f"unknown setting (known here: {known})")
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if "section" in f.metadata:
            # An absent or empty (null) section is built too, so its defaults take
            # their checked shape; `flood: off` (false) is an error, not the defaults.
            section_raw = raw.get(name)
            if section_raw is None:
                section_raw = {}
            values[name] = _build(f.metadata["section"], section_raw, source, key + ".")
            continue
        if name not in raw:
            continue
        try:
            values[name] = f.metadata["check"](raw[name])
        except ValueError as e:
            raise ConfigError(source, key, str(e)) from None
    obj = cls(**values)
    # Defaults go through the same checks, so they take the same shape (a tuple of Address).
    for name, f in fields.items():
        if name not in raw and "check" in f.metadata:
            object.__setattr__(obj, name, f.metadata["check"](getattr(obj, name)))
    return obj


def documented_keys(cls: type = Config, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every setting's dotted key with its default, doc and reload flag."""
    keys: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            keys.update(documented_keys(f.metadata["section"], f"{prefix}{f.name}."))
        else:
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            keys[prefix + f.name] = {"default": default, **f.metadata}
    return keys


def override(config: Config, values: Mapping[str, Any], source: str) -> Config:
    """``config`` with dotted keys set to ``values``, each checked like a YAML value."""
    result: Config = config
    for dotted, value in values.items():
        result = _override(result, dotted.split("."), value, source, dotted)
    return result


def _override(obj: Any, parts: list[str], value: Any, source: str, key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    f = fields.get(parts[0])
    if f is None:
        raise ConfigError(source, key, "unknown setting")
    if "section" in f.metadata and len(parts) > 1:
        new = _override(getattr(obj, f.name), parts[1:], value, source, key)
    elif "section" in f.metadata or len(parts) > 1:
        raise ConfigError(source, key, "unknown setting")
    else:
        try:
            new = f.metadata["check"](value)
        except ValueError as e:
            raise ConfigError(source, key, str(e)) from None
    return dataclasses.replace(obj, **{f.name: new})

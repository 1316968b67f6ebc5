"""The man pages: they lint clean and document every option and config key."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT

from chatd.server import config

MAN = ROOT / "man"
PAGES = sorted(MAN.glob("*.[0-9]"))
# Each command and the page documenting it.
COMMAND_PAGES = [("chatd", "chatd.8"), ("chatctl", "chatctl.8"), ("chat", "chat.1")]


def page_text(name: str) -> str:
    """The page's source with roff escapes for dashes and fonts undone."""
    text = (MAN / name).read_text()
    text = re.sub(r"\\f[BIRP]|\\f\[[A-Z]*\]", "", text)
    return text.replace("\\-", "-").replace("\\(dq", '"').replace("\\(aq", "'")


def test_the_pages_exist() -> None:
    assert {p.name for p in PAGES} == {"chatd.8", "chatd.yaml.5", "chatctl.8", "chat.1"}


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed (groff-base)")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_lints_clean_with_groff(page: Path) -> None:
    r = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


@pytest.mark.skipif(shutil.which("mandoc") is None, reason="mandoc is not installed")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_lints_clean_with_mandoc(page: Path) -> None:
    r = subprocess.run(
        ["mandoc", "-T", "lint", str(page)], capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_has_the_standard_sections(page: Path) -> None:
    sections = set(re.findall(r"^\.SH (.+)$", page.read_text(), re.M))
    assert sections >= {"NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "EXAMPLES", "SEE ALSO"}
    if page.suffix in (".1", ".8"):
        assert sections >= {"OPTIONS", "EXIT STATUS", "ENVIRONMENT"}


def run_help(command: str, *args: str) -> str:
    exe = Path(sys.executable).parent / command
    r = subprocess.run([str(exe), *args, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r
    return r.stdout


def subcommands(help_text: str) -> list[str]:
    """The commands an argparse --help lists under COMMAND (indented by four)."""
    return re.findall(r"^    ([a-z][a-z-]*)(?:\s{2,}|\n)", help_text, re.M)


def help_options(command: str) -> tuple[set[str], list[str]]:
    """Every option the command's --help shows (its subcommands' too), and the subcommands."""
    main_help = run_help(command)
    commands = subcommands(main_help)
    texts = [main_help] + [run_help(command, sub) for sub in commands]
    options = {o for t in texts for o in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", t)}
    return options, commands


@pytest.mark.parametrize(("command", "page"), COMMAND_PAGES)
def test_every_option_is_in_the_page(command: str, page: str) -> None:
    options, commands = help_options(command)
    assert "--help" in options
    text = page_text(page)
    missing = [o for o in sorted(options) if not re.search(rf"(?<![\w-]){o}(?![\w-])", text)]
    assert missing == [], f"{page} lacks {missing}"
    missing = [c for c in commands if not re.search(rf"^\.TP\n\.B[IR]? {c}\b", text, re.M)]
    assert missing == [], f"{page} has no entry for the commands {missing}"


def render(value: Any) -> str:
    """A default as chatd.yaml(5) writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(render(str(v)) for v in value) + "]"
    return str(value)


@pytest.mark.parametrize("key", list(config.documented_keys()))
def test_every_config_key_is_documented(key: str) -> None:
    info = config.documented_keys()[key]
    text = page_text("chatd.yaml.5")
    # .TP / .B key / type / Default: ... / Reload: ... (up to the next paragraph macro)
    m = re.search(rf"^\.TP\n\.B {re.escape(key)}\n(.*?)(?=^\.(?:IP|TP|SS|SH)\b)", text, re.M | re.S)
    assert m, f"chatd.yaml(5) has no entry for {key}"
    entry = " ".join(m.group(1).split())
    assert f"Default: {render(info['default'])}." in entry, entry
    reload = "applied at once" if info["reload"] else "needs restart"
    assert f"Reload: {reload}." in entry, entry

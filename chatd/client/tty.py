"""Terminal mode: prompt_toolkit keeps the input line at the bottom and prints what
arrives above it, at once, so a message never garbles what the user is typing.

One prompt serves the whole session (the terminal never leaves raw mode between
lines, so no key typed right after Enter is lost); a dumb terminal, which cannot
move the cursor, gets the line below what is being typed, which is written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from datetime import datetime

from chatd.client.render import Event, own_event, safe, styled
from chatd.client.session import INTERRUPTED, OK, Ended, Session
from chatd.wire.chat import is_quit, text_problem

QUIT_WAIT = 2.0  # seconds the daemon gets to confirm the close when the user quits

STYLE_RULES = {
    "time": "#888888",
    "name": "bold",
    "own": "ansiblue",
    "private": "ansimagenta",
    "action": "ansiyellow italic",
    "notice": "ansicyan",
    "command": "#888888 italic",
    "history": "dim",
    "status": "ansired bold",
    "prompt": "bold",
    "prompt.offline": "ansired",
}


def no_color() -> bool:
    """NO_COLOR (https://no-color.org) or a terminal without color."""
    return bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM", "") in ("", "dumb")


class TerminalUI:
    def __init__(self) -> None:
        from prompt_toolkit.output import ColorDepth
        from prompt_toolkit.styles import Style

        self.style = Style.from_dict(STYLE_RULES)
        self.color_depth = ColorDepth.DEPTH_1_BIT if no_color() else None
        self.dumb = os.environ.get("TERM", "") in ("", "dumb")
        self.prompt: Callable[[], str] = lambda: ""  # the prompt as plain text

    def _print(self, fragments: list[tuple[str, str]]) -> None:
        from prompt_toolkit import print_formatted_text
        from prompt_toolkit.application import get_app_or_none
        from prompt_toolkit.formatted_text import FormattedText
        from prompt_toolkit.renderer import print_formatted_text as render

        app = get_app_or_none()
        if self.dumb and app is not None and app.is_running and not app.is_done:
            # A dumb terminal cannot move the cursor: the line goes below what is
            # being typed, and the prompt and the typed text are written again.
            text = "".join(t for _, t in fragments)
            typed = app.current_buffer.text
            out = sys.__stdout__
            if out is not None:
                out.write(f"\n{text}\n{self.prompt()}{typed}")
                out.flush()
            return
        if app is None or not app.is_running or app.is_done or self.dumb:
            print_formatted_text(
                FormattedText(fragments),
                style=self.style,
                color_depth=self.color_depth,
                include_default_pygments_style=False,
            )
            return
        # Above a running prompt.  Not print_formatted_text, which goes through
        # run_in_terminal: that switches the terminal to cooked mode for the
        # print, and a key pressed just then (Ctrl-D, Ctrl-C) is lost.
        app.renderer.erase()
        render(app.output, [*fragments, ("", "\n")], self.style, color_depth=app.color_depth)
        app.output.flush()
        app.invalidate()

    def show(self, event: Event) -> None:
        self._print(styled(event))

    def status(self, text: str) -> None:
        now = datetime.now().strftime("%H:%M:%S")
        self._print([("class:time", now + " "), ("class:status", f"!! {safe(text)}")])

    def state_changed(self) -> None:
        from prompt_toolkit.application import get_app_or_none

        app = get_app_or_none()
        if app is not None:
            app.invalidate()


class Interrupted(Exception):
    """Ctrl-C at the prompt."""


async def interactive_mode(chat: Session, ui: TerminalUI) -> Ended:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.application import get_app
    from prompt_toolkit.buffer import Buffer
    from prompt_toolkit.formatted_text import StyleAndTextTuples
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
    from prompt_toolkit.patch_stdout import patch_stdout

    def prompt() -> StyleAndTextTuples:
        if chat.connected:
            return [("class:prompt", f"{chat.name}> ")]
        state = "(offline) " if chat.was_joined else "(connecting) "
        return [("class:prompt.offline", state), ("class:prompt", f"{chat.name}> ")]

    ui.prompt = lambda: "".join(text for _, text, *_ in prompt())
    keys = KeyBindings()

    @keys.add("c-c")
    @keys.add("<sigint>")
    def _interrupt(event: KeyPressEvent) -> None:
        # Not KeyboardInterrupt: raised in a task, that one escapes asyncio.run.
        event.app.exit(exception=Interrupted())

    session: PromptSession[str] = PromptSession(
        prompt,
        key_bindings=keys,
        history=InMemoryHistory(),
        erase_when_done=True,
        style=ui.style,
        color_depth=ui.color_depth,
        include_default_pygments_style=False,
    )

    def accept(buffer: Buffer) -> bool:
        # One prompt for the whole session: the line is sent from here and the
        # prompt stays up (the terminal never leaves raw mode between lines, so
        # no key typed right after Enter is lost).
        text = buffer.text
        if is_quit(text):
            get_app().exit(result="/quit")  # not session.app: a dumb terminal runs another
            return True
        buffer.append_to_history()
        buffer.reset()  # before the line is shown back: a dumb terminal writes the rest
        for line in text.splitlines():
            if not line.strip():
                continue
            if is_quit(line):  # in a pasted block: what came before it is sent
                get_app().exit(result="/quit")
                return False
            problem = text_problem(line)
            if problem:  # the daemon would refuse it: never shown as sent
                ui.status(f"message not sent: messages may not contain {problem}")
            elif chat.send_line(line):
                shown = own_event(chat.name, line)
                if shown is not None:
                    ui.show(shown)
            else:
                ui.status("not connected; message not sent")
        return False

    session.default_buffer.accept_handler = accept
    runner = asyncio.create_task(chat.run())
    status = OK
    with patch_stdout(raw=True):
        asking = asyncio.ensure_future(session.prompt_async())
        await asyncio.wait({asking, runner}, return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            if session.default_buffer.text:
                session.app.erase_when_done = False  # what was typed stays, to copy
            asking.cancel()
            with contextlib.suppress(asyncio.CancelledError, EOFError, Interrupted):
                await asking
            return runner.result()
        try:
            asking.result()
        except EOFError:
            pass
        except Interrupted:
            status = INTERRUPTED
        end = await chat.finish(runner, QUIT_WAIT, confirm=False)
    return Ended(status) if end.status == OK else end

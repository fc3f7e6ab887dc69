"""The chat screen's message pane: a buffer's lines wrapped to the window, newest at the
bottom, scrolled back by PgUp/PgDn or the wheel (a prompt_toolkit ``UIControl``).

Only the lines shown are made and wrapped (:func:`lanchat.chatmodel.lines_backwards`), so a
long buffer costs nothing per redraw.  Widths are terminal cells (``wcwidth``), so wide
characters wrap where the terminal wraps them.
"""

from __future__ import annotations

from collections.abc import Callable

from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.layout.controls import UIContent, UIControl
from prompt_toolkit.mouse_events import MouseEvent, MouseEventType
from prompt_toolkit.utils import get_cwidth

from lanchat.chatmodel import ChatModel, Fragments, lines_backwards

#: Continuation rows of a wrapped line start under the text, after ``[HH:MM] ``.
WRAP_INDENT = 8


def wrap(line: Fragments, width: int) -> list[StyleAndTextTuples]:
    """Screen rows of one buffer line: ``\\n`` starts a row; a row wider than ``width``
    goes on under the text (WRAP_INDENT columns in)."""
    rows: list[StyleAndTextTuples] = [[]]
    used = 0
    indent = min(WRAP_INDENT, max(0, width // 3))
    for style, text in line:
        for ch in text:
            if ch == "\n":
                rows.append([])
                used = 0
                continue
            w = get_cwidth(ch)
            if used + w > width and used > indent:
                rows.append([("", " " * indent)])
                used = indent
            rows[-1].append((style, ch))
            used += w
    return rows


class LogControl(UIControl):
    """The shown buffer of ``model``, bottom-anchored, scrolled by ``Buffer.scroll`` rows;
    the wheel calls ``scroll(rows)`` (positive: up)."""

    def __init__(self, model: ChatModel, scroll: Callable[[int], None]) -> None:
        self.model = model
        self.scroll = scroll
        self.height = 10   # rows last drawn: what PgUp/PgDn move by

    def is_focusable(self) -> bool:
        return False

    def create_content(self, width: int, height: int) -> UIContent:
        self.height = height
        buf = self.model.shown
        rows: list[StyleAndTextTuples] = []
        need = height + buf.scroll
        for line in lines_backwards(buf):  # only as much as is shown is made and wrapped
            rows[:0] = wrap(line, width)
            if len(rows) >= need:
                break
        buf.scroll = max(0, min(buf.scroll, len(rows) - height))
        end = len(rows) - buf.scroll
        shown: list[StyleAndTextTuples] = [[] for _ in range(height - (end - max(0, end - height)))]
        shown += rows[max(0, end - height):end]
        return UIContent(get_line=lambda i: shown[i], line_count=len(shown), show_cursor=False)

    def mouse_handler(self, mouse_event: MouseEvent) -> None:
        if mouse_event.event_type == MouseEventType.SCROLL_UP:
            self.scroll(3)
        elif mouse_event.event_type == MouseEventType.SCROLL_DOWN:
            self.scroll(-3)

"""Clickable links inside the chat transcript's lines.

The transcript is a ``QListWidget`` (one item per turn: selecting an answer shows its routing).
An item that carries HTML in :data:`LINK_HTML_ROLE` is drawn by :class:`LinkDelegate` as rich
text, and a click on one of its ``<a href=...>`` anchors emits ``link_activated(href)`` instead
of only selecting the line. Its plain ``text()`` stays what other code reads. Anchors are found
with the document layout's own hit test, so what is clicked is what is drawn.
"""

from __future__ import annotations

import html
import math
from typing import Any

from qtpy.QtCore import QEvent, QModelIndex, QPoint, QPointF, QRect, QRectF, QSize, Qt, Signal
from qtpy.QtGui import QAbstractTextDocumentLayout, QPalette, QTextDocument
from qtpy.QtWidgets import QApplication, QListWidget, QStyle, QStyledItemDelegate, QStyleOptionViewItem

#: Item data role holding the HTML of a line with links (None: a plain line).
LINK_HTML_ROLE = Qt.ItemDataRole.UserRole + 1
LINK_COLOUR = "#58a6ff"
_MARGIN = 2


def linked_html(prefix: str, text: str, links: list[tuple[int, int, str, str]]) -> str:
    """``prefix`` + ``text`` as HTML, with ``text[start:end]`` an anchor to ``href`` for each
    ``(start, end, href, tooltip)`` (non-overlapping; spans outside the text are skipped)."""
    parts = [html.escape(prefix)]
    cursor = 0
    for start, end, href, tip in sorted(links):
        if start < cursor or end > len(text) or start >= end:
            continue
        parts.append(html.escape(text[cursor:start]))
        title = f' title="{html.escape(tip, quote=True)}"' if tip else ""
        parts.append(f'<a href="{html.escape(href, quote=True)}"{title}>{html.escape(text[start:end])}</a>')
        cursor = end
    parts.append(html.escape(text[cursor:]))
    return "".join(parts).replace("\n", "<br>")


def _event_point(event: Any) -> QPoint:
    position = event.position() if hasattr(event, "position") else event.pos()
    return position.toPoint() if hasattr(position, "toPoint") else position


class LinkDelegate(QStyledItemDelegate):
    """Draws items with :data:`LINK_HTML_ROLE` as rich text and reports clicks on their links."""

    link_activated = Signal(str)

    def __init__(self, view: QListWidget) -> None:
        super().__init__(view)
        self._view = view
        view.viewport().setMouseTracking(True)  # a pointing hand over links

    # ------------------------------------------------------------------ layout
    def _document(self, index: QModelIndex, width: float, font: Any = None) -> QTextDocument | None:
        markup = index.data(LINK_HTML_ROLE)
        if not markup:
            return None
        document = QTextDocument()
        document.setDocumentMargin(_MARGIN)
        document.setDefaultFont(font if font is not None else self._view.font())
        document.setDefaultStyleSheet(f"a {{ color: {LINK_COLOUR}; }}")
        document.setHtml(markup)
        document.setTextWidth(max(float(width), 10.0))
        return document

    def _width(self, option: QStyleOptionViewItem) -> int:
        width = option.rect.width()
        return width if width > 0 else max(self._view.viewport().width() - 2, 10)

    def sizeHint(self, option: QStyleOptionViewItem, index: QModelIndex) -> QSize:  # noqa: N802 (Qt)
        width = max(self._view.viewport().width() - 2, 10)
        document = self._document(index, width, option.font)
        if document is None:
            return super().sizeHint(option, index)
        return QSize(int(width), int(math.ceil(document.size().height())))

    def paint(self, painter: Any, option: QStyleOptionViewItem, index: QModelIndex) -> None:
        document = self._document(index, self._width(option), option.font)
        if document is None:
            super().paint(painter, option, index)
            return
        item_option = QStyleOptionViewItem(option)
        self.initStyleOption(item_option, index)
        item_option.text = ""  # the background and selection only; the text is the document
        style = item_option.widget.style() if item_option.widget is not None else QApplication.style()
        style.drawControl(QStyle.ControlElement.CE_ItemViewItem, item_option, painter, item_option.widget)
        painter.save()
        painter.translate(QPointF(option.rect.topLeft()))
        painter.setClipRect(QRectF(0, 0, option.rect.width(), option.rect.height()))
        context = QAbstractTextDocumentLayout.PaintContext()
        selected = bool(option.state & QStyle.StateFlag.State_Selected)
        role = QPalette.ColorRole.HighlightedText if selected else QPalette.ColorRole.Text
        foreground = index.data(Qt.ItemDataRole.ForegroundRole)
        colour = foreground.color() if foreground is not None and not selected else option.palette.color(role)
        context.palette.setColor(QPalette.ColorRole.Text, colour)
        document.documentLayout().draw(painter, context)
        painter.restore()

    # ------------------------------------------------------------------ links
    def anchor_at(self, index: QModelIndex, point: QPoint) -> str:
        """The href under ``point`` (viewport coordinates) in the line ``index``, or ""."""
        rect = self._view.visualRect(index)
        document = self._document(index, rect.width())
        if document is None:
            return ""
        local = QPointF(point - rect.topLeft())
        return str(document.documentLayout().anchorAt(local) or "")

    def link_rect(self, index: QModelIndex, href: str) -> QRect:
        """Where the first character of the link ``href`` is drawn, in viewport coordinates
        (empty when the line has no such link): what a click on the link hits."""
        rect = self._view.visualRect(index)
        document = self._document(index, rect.width())
        if document is None:
            return QRect()
        block = document.begin()
        while block.isValid():
            iterator = block.begin()
            while not iterator.atEnd():
                fragment = iterator.fragment()
                if fragment.isValid() and fragment.charFormat().anchorHref() == href:
                    offset = fragment.position() - block.position()
                    bounds = document.documentLayout().blockBoundingRect(block)  # lays the block out first
                    line = block.layout().lineForTextPosition(offset)
                    if not line.isValid():
                        return QRect()
                    x = line.cursorToX(offset)
                    x = float(x[0] if isinstance(x, tuple) else x) + bounds.left()
                    top = bounds.top() + line.y()
                    character = max(int(line.height() // 2), 4)
                    return QRect(
                        rect.left() + int(x), rect.top() + int(top), character, int(math.ceil(line.height()))
                    )
                iterator += 1
            block = block.next()
        return QRect()

    def editorEvent(  # noqa: N802 (Qt name)
        self, event: Any, model: Any, option: QStyleOptionViewItem, index: QModelIndex
    ) -> bool:
        kind = event.type()
        if kind in (QEvent.Type.MouseButtonRelease, QEvent.Type.MouseMove) and index.data(LINK_HTML_ROLE):
            href = self.anchor_at(index, _event_point(event))
            if kind == QEvent.Type.MouseMove:
                cursor = Qt.CursorShape.PointingHandCursor if href else Qt.CursorShape.ArrowCursor
                self._view.viewport().setCursor(cursor)
            elif href and event.button() == Qt.MouseButton.LeftButton:
                self.link_activated.emit(href)
        return super().editorEvent(event, model, option, index)

"""Routing view: what the question asked for, which experts worked, and where in the volume.

For the answer selected in the chat transcript (the latest by default) it draws, with
matplotlib (rendered in a worker thread, shown in the dock as a picture so the viewer
never waits for a redraw):

* a bar chart of the task-group probabilities (level 1: text -> task group);
* a heatmap of mean expert weight per MoE block (level 2: token -> expert utilisation);
* a per-slice curve of the dominant expert in the chosen block;

and puts a "routing: ..." layer over the CT: the dominant expert per token as Labels, or one
chosen expert's weight as an Image heatmap. The layer holds the routing's own token grid
(a few thousand cells, not a CT-sized copy: a 300x512x512 scan resampled as int32 would be
300 MB); its scale and translate are the CT layer's, stretched to the cell size, so it lines
up with the CT in world coordinates. An answer about a part of the scan (a "this slice" slab,
a region's crop) routed only that part: its record's ``box`` says where the part lies, and the
overlay covers that box instead of the whole CT. The numbers all come from the answer's
``RoutingTrace``; this module only draws them.

The answers come from the chat's ``Conversation``, found through the viewer window's
``ConversationLink`` (or passed in): this dock never imports the chat dock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import QComboBox, QGridLayout, QLabel, QPushButton, QSizePolicy, QVBoxLayout, QWidget

from napari_tghmoe._widgets._viewer_dock import connect_while_alive, conversation_link
from napari_tghmoe.conversation import AnswerRecord, Conversation

DOMINANT = "dominant expert (labels)"
BODY_THRESHOLD_HU = -500.0  # the dominant-expert labels cover cells mostly above this (the body)
BODY_FRACTION = 0.5  # ... that is, cells with at least this share of body voxels
OVERLAY_PREFIX = "routing: "

_BACKGROUND = "#262930"  # napari's dark theme, so the plots do not glare beside the canvas
_FOREGROUND = "#d0d3d9"
_ACCENT = "#58a6ff"


def overlay_name(block: int, expert_name: str | None) -> str:
    what = "dominant expert" if expert_name is None else f"{expert_name} weight"
    return f"{OVERLAY_PREFIX}block {block} {what}"


def token_grid_geometry(
    ct_layer: Any, grid_shape: Sequence[int], box: Sequence[Sequence[int]] | None = None
) -> dict[str, Any]:
    """Layer geometry that puts a map on the routing token grid over ``ct_layer`` in world space.

    ``RoutingTrace.expert_map`` gives cell ``j`` of ``n`` the CT voxels whose centres lie in
    ``[j, j + 1) * f`` along an axis, ``f = n_ct / n``: the cell's centre is at CT data
    coordinate ``(j + 0.5) * f - 0.5``. So the overlay's voxel is ``f`` CT voxels wide and its
    first centre sits ``(f - 1) / 2`` CT voxels in, taken through the CT's own scale, rotation
    and shear; units and the extra affine are the CT's. Its outer faces are the CT's.

    ``box`` (``[start, stop)`` voxel ranges per axis): the model saw only that part of the CT, so
    the grid spans the box (``n_ct`` is the box's size, shifted by its first voxel).
    """
    from napari.utils.transforms import Affine

    start = np.zeros(3) if box is None else np.asarray([a for a, _ in box], dtype=float)
    if box is None:
        ct_shape = np.asarray(ct_layer.data.shape[-3:], dtype=float)
    else:
        ct_shape = np.asarray([b - a for a, b in box], dtype=float)
    factor = ct_shape / np.asarray(grid_shape, dtype=float)
    scale = np.asarray(ct_layer.scale, dtype=float)
    linear = Affine(scale=scale, rotate=ct_layer.rotate, shear=ct_layer.shear)
    translate = np.asarray(ct_layer.translate, dtype=float) + linear(start + (factor - 1.0) / 2.0)
    return {
        "scale": tuple(float(v) for v in scale * factor),
        "translate": tuple(float(v) for v in translate),
        "units": tuple(ct_layer.units),
        "rotate": ct_layer.rotate,
        "shear": ct_layer.shear,
        "affine": ct_layer.affine.affine_matrix,
    }


#: Voxels sampled per token cell along each axis to judge whether it is body (<= 4**3 a cell).
BODY_SAMPLES_PER_AXIS = 4


def _sample_indices(n_voxels: int, n_cells: int, per_cell: int) -> np.ndarray:
    """``per_cell`` voxel indices spread evenly inside each of ``n_cells`` cells along an axis,
    cell by cell (cell ``j`` spans ``[j, j + 1) * n_voxels / n_cells`` as in ``expert_map``)."""
    offsets = (np.arange(per_cell) + 0.5) / per_cell
    positions = (np.arange(n_cells)[:, None] + offsets[None, :]) * n_voxels / n_cells
    return np.clip(np.floor(positions).astype(np.int64), 0, n_voxels - 1).reshape(-1)


def body_cells(ct_data: Any, grid_shape: Sequence[int], threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Token cells that are mostly body (at least :data:`BODY_FRACTION` of their voxels above
    ``threshold``): the dominant-expert labels leave the air around the patient see-through.

    The share is taken over a few voxels spread through each cell (every voxel when a cell is
    at most :data:`BODY_SAMPLES_PER_AXIS` wide), so it costs the same for any CT size; a cell
    all body or all air is always judged right.
    """
    data = np.asarray(ct_data)
    grid = [int(n) for n in grid_shape]
    per_cell = [int(min(BODY_SAMPLES_PER_AXIS, np.ceil(n / g))) for n, g in zip(data.shape, grid)]
    index = [_sample_indices(n, g, k) for n, g, k in zip(data.shape, grid, per_cell)]
    body = data[np.ix_(*index)] >= threshold
    shape = [size for g, k in zip(grid, per_cell) for size in (g, k)]
    return body.reshape(shape).mean(axis=(1, 3, 5)) >= BODY_FRACTION


class RoutingView(QWidget):
    """Plots and overlay of the TGH-MoE routing of one answer."""

    plot_rendered = Signal()  # the picture of the current record's plots is on screen

    def __init__(self, napari_viewer: Any, conversation: Conversation | None = None) -> None:
        """``conversation``: the chat's; by default the one the chat dock of this viewer's
        window publishes, now or when it opens."""
        super().__init__()
        self.viewer = napari_viewer
        self.conversation: Conversation | None = None
        self.record: AnswerRecord | None = None
        self.overlay_layer: Labels | Image | None = None
        self._disconnect_conversation = lambda: None
        self._body_cache: tuple[tuple[Any, ...], np.ndarray] | None = None
        self._build_ui()
        self.show_record(None)
        link = conversation_link(napari_viewer)
        if link is not None:
            link.published.connect(self.connect_conversation)  # a chat dock opened later
        if conversation is None and link is not None:
            conversation = link.conversation
        if conversation is not None:
            self.connect_conversation(conversation)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        self.answer_combo = QComboBox()
        self.answer_combo.setToolTip("Answer whose routing is shown (the latest by default)")
        self.block_combo = QComboBox()
        self.block_combo.setToolTip("Vision block with experts")
        self.expert_combo = QComboBox()
        self.expert_combo.setToolTip("Overlay: the dominant expert per voxel, or one expert's weight")
        self.overlay_button = QPushButton("Show overlay")
        self.overlay_button.setToolTip("Add or update the 'routing: ...' layer over the CT")
        self.info_label = QLabel()
        self.info_label.setWordWrap(True)

        controls = QGridLayout()
        controls.addWidget(QLabel("Answer"), 0, 0)
        controls.addWidget(self.answer_combo, 0, 1, 1, 3)
        controls.addWidget(QLabel("Block"), 1, 0)
        controls.addWidget(self.block_combo, 1, 1)
        controls.addWidget(QLabel("Overlay"), 1, 2)
        controls.addWidget(self.expert_combo, 1, 3)
        controls.setColumnStretch(3, 1)

        # The matplotlib figure is drawn (Agg) in a worker thread and shown as a picture: a
        # FigureCanvasQTAgg redraw took 0.3-0.5 s on the GUI thread here, freezing the viewer.
        self.figure: Any = None  # the last rendered matplotlib Figure
        self.canvas = QLabel()
        self.canvas.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignHCenter)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.canvas.setMinimumSize(300, 430)
        self.rendered_turn: int | None = None
        self._render_serial = 0
        self._resize_timer = QTimer(self)
        self._resize_timer.setSingleShot(True)
        self._resize_timer.setInterval(250)
        self._resize_timer.timeout.connect(lambda: self._redraw())

        layout = QVBoxLayout(self)
        layout.addLayout(controls)
        layout.addWidget(self.canvas, 1)
        row = QGridLayout()
        row.addWidget(self.overlay_button, 0, 0)
        row.addWidget(self.info_label, 0, 1)
        row.setColumnStretch(1, 1)
        layout.addLayout(row)

        self.answer_combo.activated.connect(self._on_answer_picked)
        self.block_combo.activated.connect(lambda _: self._redraw(update_overlay=True))
        self.expert_combo.activated.connect(lambda _: self.update_overlay())
        self.overlay_button.clicked.connect(lambda: self.update_overlay(create=True, show=True))

    # ------------------------------------------------------------------ the conversation
    def connect_conversation(self, conversation: Conversation) -> None:
        """Follow ``conversation``'s answers (instead of any earlier one); show its selected one."""
        if conversation is self.conversation:
            return
        self._disconnect_conversation()
        self.conversation = conversation
        self._disconnect_conversation = connect_while_alive(
            self,
            [
                (conversation.answer_recorded, self._on_answer_recorded),
                (conversation.answer_selected, self._on_answer_selected),
            ],
        )
        self._refresh_answers()
        shown = conversation.selected_record()
        if shown is not None:
            self.show_record(shown)

    def _refresh_answers(self) -> None:
        self.answer_combo.blockSignals(True)
        self.answer_combo.clear()
        if self.conversation is not None:
            for turn_id, record in sorted(self.conversation.records.items()):
                if getattr(record.answer, "routing", None) is not None:
                    self.answer_combo.addItem(record.label, turn_id)
        if self.record is not None:
            index = self.answer_combo.findData(self.record.turn_id)
            if index >= 0:
                self.answer_combo.setCurrentIndex(index)
        self.answer_combo.blockSignals(False)

    def _on_answer_recorded(self, record: AnswerRecord) -> None:
        self._refresh_answers()

    def _on_answer_selected(self, turn_id: int) -> None:
        if self.conversation is None:
            return
        if turn_id < 0:  # a new conversation
            self._refresh_answers()
            self.show_record(None)
            return
        record = self.conversation.records.get(turn_id)
        if record is not None:
            self._refresh_answers()
            self.show_record(record)

    def _on_answer_picked(self, index: int) -> None:
        turn_id = self.answer_combo.itemData(index)
        if self.conversation is not None and turn_id in self.conversation.records:
            self.conversation.select_answer(turn_id)  # keeps transcript and plots in step

    # ------------------------------------------------------------------ showing
    @property
    def trace(self) -> Any:
        return getattr(self.record.answer, "routing", None) if self.record is not None else None

    def show_record(self, record: AnswerRecord | None) -> None:
        """Show the routing of ``record`` (None: clear the plots)."""
        self.record = record
        trace = self.trace
        previous_block, previous_expert = self.current_block(), self.current_expert()
        self.block_combo.clear()
        self.expert_combo.clear()
        if trace is not None:
            for block in trace.blocks:
                self.block_combo.addItem(f"block {block}", int(block))
            self.expert_combo.addItem(DOMINANT, None)
            for index, name in enumerate(trace.expert_names):
                self.expert_combo.addItem(f"{name} weight", index)
            # keep the user's block / expert when the new answer has them; else the deepest
            # block (the one with task groups) and the dominant-expert labels
            block_index = self.block_combo.findData(previous_block) if previous_block is not None else -1
            self.block_combo.setCurrentIndex(block_index if block_index >= 0 else len(trace.blocks) - 1)
            expert_index = self.expert_combo.findData(previous_expert) if previous_expert is not None else -1
            self.expert_combo.setCurrentIndex(max(expert_index, 0))
            index = self.answer_combo.findData(record.turn_id)
            if index >= 0:
                self.answer_combo.setCurrentIndex(index)
        self.overlay_button.setEnabled(trace is not None)
        self._redraw(update_overlay=True)

    def current_block(self) -> int | None:
        return self.block_combo.currentData()

    def current_expert(self) -> int | None:
        return self.expert_combo.currentData()

    def _redraw(self, update_overlay: bool = False) -> None:
        """Render the plots for the current record in a worker; the picture replaces the old one."""
        from napari.qt.threading import create_worker

        trace = self.trace
        block = self.current_block()
        if trace is None:
            message = "No answer yet" if self.record is None else "This answer has no routing record"
            self.info_label.setText("")
        else:
            message = ""
            box = getattr(self.record, "box", None)
            part = ""
            if box is not None:  # the model saw a part of the scan: say which
                part = ", voxels " + ", ".join(f"{n} {a}-{b - 1}" for n, (a, b) in zip("zyx", box))
            self.info_label.setText(f"{self.record.label} \u2192 layer {self.record.layer_name!r}{part}")
        n_slices = self.record.volume.shape[0] if self.record is not None else 0
        size = (max(self.canvas.width(), 300), max(self.canvas.height(), 430))
        self._render_serial += 1
        serial, turn = self._render_serial, (self.record.turn_id if self.record is not None else None)
        worker = create_worker(
            render_routing_figure, trace, block, n_slices, size, message, _start_thread=False, _ignore_errors=True
        )
        worker.returned.connect(lambda result: self._on_rendered(result, serial, turn))
        worker.errored.connect(lambda err: self.info_label.setText(f"Plot failed: {err}"))
        worker.start()
        if update_overlay and self.overlay_layer is not None:
            self.update_overlay()

    def _on_rendered(self, result: tuple[Any, np.ndarray], serial: int, turn: int | None) -> None:
        if serial != self._render_serial:
            return  # a newer request is on its way
        from qtpy.QtGui import QImage, QPixmap

        figure, rgba = result
        height, width = rgba.shape[:2]
        image = QImage(rgba.data, width, height, 4 * width, QImage.Format.Format_RGBA8888).copy()
        try:
            self.canvas.setPixmap(QPixmap.fromImage(image))
        except RuntimeError:  # the dock was closed while the plots were drawn
            return
        self.figure = figure
        self.rendered_turn = turn
        self.plot_rendered.emit()

    def wait_until_rendered(self, timeout_s: float = 60.0) -> bool:
        """Run the event loop until the plots of the current record are shown (scripted demos)."""
        import time

        from qtpy.QtWidgets import QApplication

        want = self.record.turn_id if self.record is not None else None
        deadline = time.perf_counter() + timeout_s
        while self.rendered_turn != want or self.figure is None:
            if time.perf_counter() > deadline:
                return False
            QApplication.processEvents()
            time.sleep(0.01)
        return True

    def resizeEvent(self, event: Any) -> None:  # noqa: N802
        super().resizeEvent(event)
        self._resize_timer.start()

    # ------------------------------------------------------------------ overlay
    def update_overlay(self, create: bool = False, show: bool = False) -> Labels | Image | None:
        """Add (``create``) or refresh the overlay layer for the chosen block and expert.

        The layer holds the token grid, placed over the CT by :func:`token_grid_geometry`.
        A new overlay starts hidden unless ``show`` (the user pressed "Show overlay"): the CT
        is read untinted until someone asks; a refreshed one keeps its visibility.
        """
        trace = self.trace
        if trace is None or (self.overlay_layer is None and not create):
            return None
        ct_layer = self.record.layer
        if ct_layer is None or ct_layer not in self.viewer.layers:
            message = f"The CT layer {self.record.layer_name!r} of this answer is no longer open."
            show_error(message)
            if self.conversation is not None:
                self.conversation.report_error(message)
            return None
        block = self.current_block()
        expert = self.current_expert()
        box = self._record_box(ct_layer)
        name = overlay_name(block, None if expert is None else trace.expert_names[expert])
        if expert is None:
            labels = np.asarray(trace.expert_map(block), dtype=np.int32) + 1  # 0 is see-through
            # Label the body only: air around the patient would fill the 3D view with a box.
            labels[~self._body_cells(ct_layer, labels.shape, box)] = 0
            geometry = token_grid_geometry(ct_layer, labels.shape, box)
            layer = self._replace_overlay(Labels, labels, name, geometry, opacity=0.35, blending="translucent")
            layer.metadata["label_names"] = {i + 1: n for i, n in enumerate(trace.expert_names)}  # legend
        else:
            weights = np.asarray(trace.expert_map(block, expert=expert), dtype=np.float32)
            geometry = token_grid_geometry(ct_layer, weights.shape, box)
            high = float(weights.max()) or 1.0
            layer = self._replace_overlay(
                Image, weights, name, geometry,
                colormap="inferno", contrast_limits=(0.0, high), opacity=0.55, blending="additive",
                interpolation2d="linear", interpolation3d="linear",  # smooth, as the CT-sized map was
            )
        if show:
            layer.visible = True
        return layer

    def _record_box(self, ct_layer: Any) -> tuple[tuple[int, int], ...] | None:
        """The part of the CT the answer's model saw (None: all of it, or a box that does not fit)."""
        box = getattr(self.record, "box", None)
        if box is None:
            return None
        shape = tuple(ct_layer.data.shape[-3:])
        if len(box) != 3 or any(not 0 <= a < b <= n for (a, b), n in zip(box, shape)):
            return None
        return tuple((int(a), int(b)) for a, b in box)

    def _body_cells(self, ct_layer: Any, grid_shape: tuple[int, ...], box: Any = None) -> np.ndarray:
        """:func:`body_cells` of the CT (or of the box the model saw), kept while CT, box and grid
        stay (blocks share one grid)."""
        key = (id(ct_layer), id(ct_layer.data), tuple(int(n) for n in grid_shape), box)
        if self._body_cache is None or self._body_cache[0] != key:
            data = ct_layer.data if box is None else ct_layer.data[tuple(slice(a, b) for a, b in box)]
            self._body_cache = (key, body_cells(data, grid_shape))
        return self._body_cache[1]

    def _replace_overlay(self, kind: type, data: np.ndarray, name: str, geometry: dict, **style: Any) -> Any:
        old = self.overlay_layer
        if old is not None and old in self.viewer.layers and isinstance(old, kind) and old.data.shape == data.shape:
            old.data = data
            old.name = name
            for key, value in geometry.items():
                setattr(old, key, value)
            if kind is Image:
                old.contrast_limits = style["contrast_limits"]
            layer = old
        else:
            if old is not None and old in self.viewer.layers:
                self.viewer.layers.remove(old)
            visible = old.visible if old is not None else False
            layer = kind(data, name=name, metadata={"routing_overlay": True}, visible=visible, **geometry, **style)
            self.viewer.add_layer(layer)
        if self.record is not None and self.record.layer is not None:
            self.viewer.layers.selection.active = self.record.layer  # keep the chat on the CT
        self.overlay_layer = layer
        return layer


def _row_outline(row: int, width: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((-0.5, row - 0.5), width, 1.0, fill=False, edgecolor="#7ee787", linewidth=1.5)


# ---------------------------------------------------------------------------- plotting
# Pure matplotlib (Agg, no pyplot, no Qt): safe to run in a worker thread.


def _style(ax: Any) -> None:
    ax.set_facecolor(_BACKGROUND)
    ax.tick_params(colors=_FOREGROUND, labelsize=7)
    for spine in ax.spines.values():
        spine.set_color("#5a5f68")
    ax.title.set_color(_FOREGROUND)
    ax.title.set_fontsize(8)
    ax.xaxis.label.set_color(_FOREGROUND)
    ax.yaxis.label.set_color(_FOREGROUND)


def render_routing_figure(
    trace: Any, block: int | None, n_slices: int, size_px: tuple[int, int], message: str = ""
) -> tuple[Any, np.ndarray]:
    """Draw the three routing plots; return the Figure and its RGBA pixels (H, W, 4) uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    # constrained layout keeps tick labels and titles apart; it costs extra draws, but this
    # runs in a worker thread
    figure = Figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi, facecolor=_BACKGROUND, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    if trace is None:
        ax = figure.add_subplot(1, 1, 1)
        _style(ax)
        ax.text(0.5, 0.5, (message or "No answer yet") + "\n(ask a question in the chat)",
                ha="center", va="center", color=_FOREGROUND)
        ax.set_axis_off()
    else:
        gate = getattr(trace, "volume_gate", None)
        ratios = [0.8, 1.0, 1.5] + ([0.6] if gate is not None else [])
        axes = figure.subplots(len(ratios), 1, height_ratios=ratios)
        _plot_task_probs(axes[0], trace)
        _plot_utilisation(figure, axes[1], trace, block)
        _plot_dominant_per_slice(axes[2], trace, block, n_slices)
        if gate is not None:
            _plot_volume_gate(axes[3], gate)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba()).copy()
    return figure, rgba


def _plot_task_probs(ax: Any, trace: Any) -> None:
    probs = trace.task_probs()
    names, values = list(probs), [float(v) for v in probs.values()]
    ax.barh(names, values, color=_ACCENT)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    for y, value in enumerate(values):
        ax.text(min(value + 0.02, 0.9), y, f"{value:.2f}", va="center", color=_FOREGROUND, fontsize=7)
    ax.set_title("What the text asked for: task-group probability")
    _style(ax)


VOLUME_GATE_TITLE = "What the text asked of the 3D evidence: projector expert weight"


def _plot_volume_gate(ax: Any, gate: Any) -> None:
    """The text-guided gate over the 3D evidence projector's experts (a model with a 3D encoder):
    the same instruction that routes the vision experts also weights these, so a report request
    and a question differ here too."""
    weights = np.asarray(gate, dtype=float).reshape(-1, np.asarray(gate).shape[-1])[0]
    ax.bar(range(len(weights)), weights, color=_ACCENT)
    ax.set_xticks(range(len(weights)), [f"expert {i}" for i in range(len(weights))], fontsize=6)
    ax.set_ylim(0, max(1.0, float(weights.max()) if weights.size else 1.0))
    ax.set_title(VOLUME_GATE_TITLE)
    _style(ax)


def _plot_utilisation(figure: Any, ax: Any, trace: Any, block: int | None) -> None:
    rows = np.stack([np.asarray(trace.utilisation(b), dtype=float).reshape(-1) for b in trace.blocks])
    image = ax.imshow(rows, aspect="auto", cmap="magma", vmin=0.0, interpolation="nearest")
    ax.set_yticks(range(len(trace.blocks)), [f"block {b}" for b in trace.blocks])
    ax.set_xticks(range(len(trace.expert_names)), trace.expert_names, rotation=90, fontsize=6)
    if block is not None and block in trace.blocks:
        row = list(trace.blocks).index(block)
        ax.add_patch(_row_outline(row, len(trace.expert_names)))
    colorbar = figure.colorbar(image, ax=ax, fraction=0.04, pad=0.01)
    colorbar.ax.tick_params(colors=_FOREGROUND, labelsize=6)
    ax.set_title("Mean expert weight per MoE block")
    _style(ax)


def _plot_dominant_per_slice(ax: Any, trace: Any, block: int | None, n_slices: int) -> None:
    if block is None or n_slices < 1:
        return
    dominant = np.asarray(trace.dominant_per_slice(block, n_slices)).reshape(-1)
    # Only this block's experts on the axis (shallow blocks carry the shared group only).
    carried = [i for i, name in enumerate(trace.expert_names) if name.split(".")[0] in trace.block_groups[block]]
    rows = {expert: row for row, expert in enumerate(carried)}
    ax.step(np.arange(len(dominant)), [rows.get(int(e), 0) for e in dominant], where="mid",
            color=_ACCENT, linewidth=1.5)
    ax.set_yticks(range(len(carried)), [trace.expert_names[i] for i in carried], fontsize=6)
    ax.set_ylim(-0.5, len(carried) - 0.5)
    ax.set_xlim(0, max(len(dominant) - 1, 1))
    ax.set_xlabel("axial slice (feet \u2192 head)", fontsize=7)
    ax.set_title(f"Dominant expert per slice, block {block}")
    _style(ax)

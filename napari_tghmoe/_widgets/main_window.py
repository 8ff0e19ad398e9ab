"""The CT reading layout: 3D main canvas, linked plane views, window/level (and chat) docks.

``setup_viewer`` arranges an existing napari viewer; ``launch`` opens one (optionally from a
file, else the chest phantom) and can save a screenshot of the whole window and quit, which
``python -m napari_tghmoe --screenshot PATH`` and ``scripts/demo.sh`` use.

Layout: as in 3D Slicer, Four-Up by default (axial, 3D, sagittal, coronal in a 2x2 grid in
the window's central area; ``layout.py``), switchable to one plane + 3D or 3D only and
remembered; the right side holds the window/level dock and the chat, routing and segment
docks. Mouse and keys follow PACS habits (``ortho_views.py``, ``shortcuts.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Surface
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication, QWidget

from napari_tghmoe.io._types import CTVolume
from napari_tghmoe.layers import BONE_ISO_THRESHOLD_HU, ct_layer_kwargs, ct_volume_of
from napari_tghmoe._widgets import _napari_private
from napari_tghmoe._widgets.layout import ReadingLayout
from napari_tghmoe._widgets.ortho_views import VIEW_3D_ONLY_KEY, OrthoViewsWidget
from napari_tghmoe._widgets.window_level import WindowLevelWidget

if TYPE_CHECKING:
    from napari_tghmoe._widgets.chat import ChatWidget
    from napari_tghmoe._widgets.routing_view import RoutingView
    from napari_tghmoe.conversation import AnswerRecord

WINDOW_LEVEL_DOCK_NAME = "Window / level"
#: Where later docks go: the chat and routing views sit on the right.
CHAT_DOCK_AREA = "right"
CHAT_DOCK_NAME = "Ask the CT model"
ROUTING_DOCK_NAME = "Expert routing"
DEFAULT_WINDOW_SIZE = (1600, 1000)


@dataclass
class CTWorkspace:
    """Handles on what ``setup_viewer`` built, for tests and for later docks."""

    viewer: Any
    ct_layer: Image | None
    ortho_views: OrthoViewsWidget
    window_level: WindowLevelWidget
    layout: ReadingLayout
    docks: dict[str, QWidget] = field(default_factory=dict)
    shortcuts: dict[str, Any] = field(default_factory=dict)
    bone_surface: BoneSurface | None = None  # the 3D view's bone mesh (built in a worker)

    def reset_views(self) -> None:
        """``R``: every plane fitted to its window, the 3D view from the front, fitted."""
        self.ortho_views.fit_all()
        if len(self.viewer.layers) == 0:
            return
        if self.viewer.dims.ndisplay == 3:
            show_anterior_3d(self.viewer)
        else:
            self.viewer.reset_view()


def _find_ct_layer(viewer: Any) -> Image | None:
    images = [
        layer
        for layer in viewer.layers
        if isinstance(layer, Image) and layer.ndim == 3 and not layer.metadata.get(VIEW_3D_ONLY_KEY)
    ]
    with_volume = [layer for layer in images if ct_volume_of(layer) is not None]
    return (with_volume or images or [None])[-1]


def center_cursor_on(viewer: Any, layer: Image) -> None:
    """Put the shared cursor (``dims.point``) at the centre voxel of ``layer``."""
    center_index = (np.asarray(layer.data.shape, dtype=float) - 1) / 2.0
    world = np.asarray(layer.translate) + np.asarray(layer.scale) * np.round(center_index)
    viewer.dims.point = tuple(float(v) for v in world)


def show_anterior_3d(viewer: Any) -> None:
    """3D camera as in a radiology 3D view: from the front, head up, patient's right on
    the screen's left.

    World axes (z, y, x) are (superior, posterior, patient-left): LPS listed backwards, a
    left-handed frame in napari's axis order, so the depth axis is flipped ("away") to
    show the anatomy unmirrored; then the camera looks from anterior, a little from above
    and from the patient's right (so the axial plane at the cursor is seen), z up.
    """
    viewer.dims.ndisplay = 3
    viewer.camera.orientation = ("away", "down", "right")
    viewer.camera.set_view_direction(view_direction=(-0.35, 0.85, 0.4), up_direction=(1, 0, 0))
    viewer.fit_to_view()


#: The bone mesh: marching cubes runs on a block-mean copy of the CT whose blocks are about this
#: many mm on a side (never finer than the CT), of at most this many voxels, and the mesh keeps at
#: most this many triangles (llvmpipe, no GPU: ~50 k triangles draw in ~65 ms, ~240 k in ~140 ms,
#: against 3-4.5 s for ray-casting a 600 x 512 x 512 CT; docs/benchmarks.md, UI).
BONE_MESH_BLOCK_MM = 1.4
BONE_MESH_MAX_VOXELS = 16_000_000
BONE_MESH_MAX_TRIANGLES = 300_000
#: Metadata key of the bone surface layer: the block-mean factors (z, y, x) its mesh came from.
BONE_MESH_KEY = "tghmoe_bone_mesh_factors"


@dataclass(frozen=True)
class BoneMesh:
    """A bone iso-surface as triangles, in the CT's own voxel coordinates (z, y, x)."""

    vertices: np.ndarray  # (n, 3) float32 voxel coordinates of the full-resolution CT
    faces: np.ndarray  # (m, 3) int32 indices into ``vertices``
    factors: tuple[int, int, int]  # block-mean factors of the copy marching cubes ran on
    normals: np.ndarray  # (n, 3) float32 unit normals in the same voxel coordinates

    @property
    def n_triangles(self) -> int:
        return int(len(self.faces))


def _sum_blocks(a: np.ndarray, factor: int, axis: int) -> np.ndarray:
    """Sums of ``factor`` neighbours along ``axis`` (float32; strided adds, no 6D reshape)."""
    index: list[slice] = [slice(None)] * a.ndim
    index[axis] = slice(0, None, factor)
    out = a[tuple(index)].astype(np.float32)
    for offset in range(1, factor):
        index[axis] = slice(offset, None, factor)
        out += a[tuple(index)]
    return out


def block_mean(data: Any, factors: tuple[int, int, int], chunk_blocks: int = 8) -> np.ndarray:
    """Mean of each ``factors`` block of ``data`` as float32 (edge blocks padded by repetition).

    Works through a few slabs at a time, so a 600 x 512 x 512 int16 CT never needs a float copy
    of itself (600 MiB more) on top of the one the viewer holds.
    """
    fz, fy, fx = (int(f) for f in factors)
    depth, height, width = data.shape
    nz, ny, nx = -(-depth // fz), -(-height // fy), -(-width // fx)
    out = np.empty((nz, ny, nx), np.float32)
    pad_y, pad_x = ny * fy - height, nx * fx - width
    for k0 in range(0, nz, chunk_blocks):
        k1 = min(nz, k0 + chunk_blocks)
        slab = np.asarray(data[k0 * fz : k1 * fz])
        pad_z = (k1 - k0) * fz - slab.shape[0]
        if pad_z or pad_y or pad_x:
            slab = np.pad(slab, ((0, pad_z), (0, pad_y), (0, pad_x)), mode="edge")
        sums = _sum_blocks(_sum_blocks(_sum_blocks(slab, fx, 2), fy, 1), fz, 0)
        out[k0:k1] = sums * np.float32(1.0 / (fz * fy * fx))
    return out


def mesh_factors(
    shape: tuple[int, ...], spacing: tuple[float, ...], block_mm: float = BONE_MESH_BLOCK_MM,
    max_voxels: int = BONE_MESH_MAX_VOXELS,
) -> tuple[int, int, int]:
    """Block-mean factors: blocks about ``block_mm`` on a side, coarsened (finest axis first)
    until the copy has at most ``max_voxels`` voxels."""
    spacing_mm = np.abs(np.asarray(spacing, dtype=float))
    factors = np.maximum(1, np.round(block_mm / np.maximum(spacing_mm, 1e-6))).astype(int)
    shape_arr = np.asarray(shape, dtype=float)
    while np.prod(np.ceil(shape_arr / factors)) > max_voxels:
        factors[int(np.argmin(factors * spacing_mm))] += 1
    return (int(factors[0]), int(factors[1]), int(factors[2]))


def bone_mesh(
    data: Any,
    spacing: tuple[float, ...],
    threshold: float = BONE_ISO_THRESHOLD_HU,
    *,
    max_triangles: int = BONE_MESH_MAX_TRIANGLES,
    max_voxels: int = BONE_MESH_MAX_VOXELS,
) -> BoneMesh:
    """The ``threshold`` HU iso-surface of ``data`` as a triangle mesh (marching cubes on a
    block-mean copy, coarser until it has at most ``max_triangles``); empty without bone.

    Why a mesh: without a GPU the 3D view ray-cast the full CT on every repaint (seconds); a mesh
    of this size draws in tens of milliseconds and is computed once.
    """
    from skimage.measure import marching_cubes

    factors = mesh_factors(tuple(data.shape), spacing, max_voxels=max_voxels)
    spacing_mm = np.abs(np.asarray(spacing, dtype=float))
    for _attempt in range(8):
        coarse = block_mean(data, factors)
        if not float(coarse.min()) < threshold < float(coarse.max()):
            none = np.zeros((0, 3), np.float32)
            return BoneMesh(none, np.zeros((0, 3), np.int32), factors, none)  # no bone at this resolution
        vertices, faces, normals, _values = marching_cubes(
            coarse, level=float(threshold), allow_degenerate=False
        )
        if len(faces) <= max_triangles:
            break
        grown = np.asarray(factors)
        grown[int(np.argmin(grown * spacing_mm))] += 1
        factors = (int(grown[0]), int(grown[1]), int(grown[2]))
    # block i of the copy is the mean of CT voxels i*f .. i*f+f-1: its centre is i*f + (f-1)/2
    f = np.asarray(factors, dtype=np.float32)
    vertices = vertices.astype(np.float32) * f + (f - 1.0) / 2.0
    normals = normals.astype(np.float32) / f  # a normal maps with the inverse transpose: 1 / f
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    return BoneMesh(vertices, faces.astype(np.int32), factors, normals)


class BoneSurface:
    """The 3D view's bone surface: a mesh computed in a worker thread, added when it is ready.

    ``layer`` is the napari Surface layer (None until the mesh is ready, or when the CT has no
    bone); it carries the CT layer's transforms, its vertices being CT voxel coordinates, so it
    lines up in world coordinates. It is a 3D-only helper: the plane views copy image and labels
    layers only, and it is hidden while the viewer is 2D.
    """

    def __init__(self, viewer: Any, ct_layer: Image, threshold: float = BONE_ISO_THRESHOLD_HU) -> None:
        self.viewer = viewer
        self.ct_layer = ct_layer
        self.threshold = float(threshold)
        self.layer: Surface | None = None
        self.mesh: BoneMesh | None = None
        self.error: str | None = None
        self.done = False
        self.seconds: float | None = None  # time the mesh took in the worker
        self._worker: Any = None

    def start(self) -> None:
        """Compute the mesh in a ``thread_worker``; the viewer keeps drawing meanwhile."""
        from napari.qt.threading import create_worker

        data, spacing, threshold = self.ct_layer.data, tuple(self.ct_layer.scale), self.threshold

        def compute() -> tuple[BoneMesh, float]:
            import time

            started = time.perf_counter()
            mesh = bone_mesh(data, spacing, threshold)
            return mesh, time.perf_counter() - started

        worker = create_worker(compute, _start_thread=False, _ignore_errors=True)  # errors: _failed
        worker.returned.connect(self._ready)
        worker.errored.connect(self._failed)
        self._worker = worker
        worker.start()

    def _viewer_gone(self) -> bool:
        return not _napari_private.has_qt_window(self.viewer) or self.ct_layer not in self.viewer.layers

    def _ready(self, result: tuple[BoneMesh, float]) -> None:
        self.mesh, self.seconds = result
        self.done = True
        if self._viewer_gone() or self.mesh.n_triangles == 0:
            return  # the viewer closed (or the CT was removed) meanwhile; or there is no bone
        self.layer = add_bone_mesh_layer(self.viewer, self.ct_layer, self.mesh)

    def _failed(self, err: BaseException) -> None:
        self.done = True
        self.error = f"{type(err).__name__}: {err}"
        if not self._viewer_gone():
            from napari.utils.notifications import show_warning

            show_warning(f"The 3D bone surface could not be built: {self.error}")

    def wait(self, timeout_s: float = 120.0) -> Surface | None:
        """Run the Qt event loop until the mesh is in (scripts, screenshots, tests); the layer."""
        import time

        deadline = time.perf_counter() + timeout_s
        while not self.done and time.perf_counter() < deadline:
            QApplication.processEvents()
            time.sleep(0.005)
        QApplication.processEvents()
        return self.layer


#: Colour of the bone surface, and where its light comes from in world (z, y, x) coordinates: the
#: default 3D camera's side (front, above, patient's right), see ``show_anterior_3d``.
BONE_RGB = (0.93, 0.89, 0.80)
BONE_LIGHT_DIRECTION = (0.35, -0.85, -0.4)
BONE_AMBIENT = 0.3


def bone_vertex_colors(mesh: BoneMesh, ct_layer: Image) -> np.ndarray:
    """RGBA per vertex, lit in world coordinates (two-sided, from the default camera's side).

    Why baked: napari's own Surface shading puts its light behind the camera when the 3D view's
    depth axis is flipped, as the radiological view here is (``show_anterior_3d``); the bone
    then looked dark grey.
    """
    origin = np.asarray(ct_layer.data_to_world(np.zeros(3)), dtype=float)
    unit_steps = [np.asarray(ct_layer.data_to_world(np.eye(3)[axis]), dtype=float) for axis in range(3)]
    linear = np.stack([step - origin for step in unit_steps], axis=1)  # voxel -> world, linear part
    normals = mesh.normals.astype(float) @ np.linalg.inv(linear)  # (inverse transpose) applied per row
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    light = np.asarray(BONE_LIGHT_DIRECTION, dtype=float)
    light /= np.linalg.norm(light)
    shade = BONE_AMBIENT + (1.0 - BONE_AMBIENT) * np.abs(normals @ light)
    colors = np.ones((len(normals), 4), dtype=np.float32)
    colors[:, :3] = shade[:, None] * np.asarray(BONE_RGB, dtype=float)[None, :]
    return colors


def add_bone_mesh_layer(viewer: Any, ct_layer: Image, mesh: BoneMesh) -> Surface:
    """``mesh`` as a 3D-only Surface layer with ``ct_layer``'s transforms (the CT stays active)."""
    values = np.ones(len(mesh.vertices), dtype=np.float32)  # the colours are per vertex
    active = viewer.layers.selection.active
    surface = viewer.add_surface(
        (mesh.vertices, mesh.faces, values),
        vertex_colors=bone_vertex_colors(mesh, ct_layer),
        name=f"{ct_layer.name} (bone surface)",
        scale=tuple(ct_layer.scale),
        translate=tuple(ct_layer.translate),
        rotate=np.asarray(ct_layer.rotate),
        shear=np.asarray(ct_layer.shear),
        affine=np.asarray(ct_layer.affine.affine_matrix),
        units=tuple(ct_layer.units),
        shading="none",  # lit in bone_vertex_colors
        blending="translucent",
        metadata={VIEW_3D_ONLY_KEY: True, BONE_MESH_KEY: mesh.factors},
        visible=viewer.dims.ndisplay == 3,
    )

    def show_in_3d_only(_event: Any = None) -> None:
        surface.visible = viewer.dims.ndisplay == 3

    viewer.dims.events.ndisplay.connect(show_in_3d_only)
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active  # a mesh arriving later must not take the selection
    return surface


def show_plane_at_cursor(viewer: Any, ct_layer: Image) -> None:
    """Draw ``ct_layer`` in 3D as its axial plane, kept at the cursor's slice.

    The plane moves only when the cursor moves along its normal (an axial step): a coronal or
    sagittal step, or a click within the slice, would put it at a new in-plane position that
    draws the same picture, and each plane move asks the 3D view for a new frame.
    """
    ct_layer.depiction = "plane"
    ct_layer.plane.normal = (1.0, 0.0, 0.0)  # axial
    ct_layer.blending = "translucent"

    def follow_cursor(_event: Any = None) -> None:
        if len(viewer.dims.point) != 3:
            return
        data_point = np.asarray(ct_layer.world_to_data(viewer.dims.point), dtype=float)
        offset = data_point - np.asarray(ct_layer.plane.position, dtype=float)
        if np.isclose(float(np.dot(offset, np.asarray(ct_layer.plane.normal, dtype=float))), 0.0):
            return  # the plane did not move: no new 3D frame for the same picture
        ct_layer.plane.position = tuple(float(v) for v in data_point)

    viewer.dims.events.point.connect(follow_cursor)
    follow_cursor()


def add_bone_surface(viewer: Any, ct_layer: Image, *, plane_at_cursor: bool = True) -> BoneSurface:
    """3D Slicer's default CT scene: a shaded bone surface (a triangle mesh at
    ``BONE_ISO_THRESHOLD_HU``, built in a worker thread and added when ready) and, with
    ``plane_at_cursor``, the CT drawn as its axial plane at the cursor (its 2D window stays the
    reading window). The surface is visible only while the viewer is 3D."""
    if plane_at_cursor:
        show_plane_at_cursor(viewer, ct_layer)
    surface = BoneSurface(viewer, ct_layer)
    surface.start()
    return surface


def setup_viewer(
    viewer: Any,
    volume_or_layer: CTVolume | Image | None = None,
    *,
    ndisplay: int = 3,
    bone_surface: bool = True,
    layout: str | None = None,
    settings_file: str | Path | None = None,
) -> CTWorkspace:
    """Arrange ``viewer`` for reading a CT: 3D main view and plane views in a Slicer layout
    (``layout``; None: the one remembered, else Four-Up), W/L dock, PACS mouse and keys.

    With ``bone_surface`` the 3D view is drawn as 3D Slicer's default CT scene: a shaded
    bone surface (a 3D-only triangle mesh, built in a worker thread:
    ``workspace.bone_surface``) plus the CT's axial plane at the cursor in the reading window.
    The W/L dock switches the CT layer to volume rendering (attenuated MIP, MIP,
    iso-surface...) instead.

    ``volume_or_layer`` is a CTVolume to add, an image layer already in the viewer, or None
    to use the viewer's CT layer (if any). Safe to call on an empty viewer.
    """
    if isinstance(volume_or_layer, CTVolume):
        layer = viewer.add_image(volume_or_layer.hu, **ct_layer_kwargs(volume_or_layer))
    elif isinstance(volume_or_layer, Image):
        layer = volume_or_layer
        if layer not in viewer.layers:
            viewer.add_layer(layer)
    else:
        layer = _find_ct_layer(viewer)

    bone: BoneSurface | None = None
    if layer is not None:
        center_cursor_on(viewer, layer)
        viewer.scale_bar.visible = True  # in the CT layer's units (mm for our readers)
        if bone_surface and layer.ndim == 3:
            bone = add_bone_surface(viewer, layer)
        viewer.layers.selection.active = layer
        if ndisplay == 3:
            show_anterior_3d(viewer)

    ortho = OrthoViewsWidget(viewer, orientation=Qt.Orientation.Horizontal, arrange=False)
    reading_layout = ReadingLayout(viewer, ortho, layout=layout, settings_file=settings_file)
    window_level = WindowLevelWidget(viewer)
    ortho.window_target = window_level.target_layer  # a W/L drag acts on the CT, never an overlay
    docks = {
        WINDOW_LEVEL_DOCK_NAME: viewer.window.add_dock_widget(
            window_level, name=WINDOW_LEVEL_DOCK_NAME, area=CHAT_DOCK_AREA
        ),
    }
    workspace = CTWorkspace(viewer, layer, ortho, window_level, reading_layout, docks, bone_surface=bone)
    from napari_tghmoe._widgets.shortcuts import install_shortcuts

    workspace.shortcuts = install_shortcuts(
        viewer, reset_views=workspace.reset_views, apply_preset=window_level.apply_preset
    )
    QApplication.processEvents()
    ortho.fit_all()
    if layer is not None and ndisplay == 3:
        viewer.fit_to_view()  # the canvas shrank when the docks arrived
    return workspace


def dock_assistant(
    viewer: Any, *, area: str = CHAT_DOCK_AREA, **chat_options: Any
) -> tuple[ChatWidget, RoutingView]:
    """Dock the chat and the routing view (the demo launcher's layout); return both widgets.

    The routing view is handed the chat's conversation; docks opened from the Plugins menu
    find it through the window's ``ConversationLink`` instead.
    """
    from napari_tghmoe._widgets.chat import ChatWidget
    from napari_tghmoe._widgets.routing_view import RoutingView

    chat = ChatWidget(viewer, **chat_options)
    routing = RoutingView(viewer, conversation=chat.conversation)
    viewer.window.add_dock_widget(chat, name=CHAT_DOCK_NAME, area=area)
    viewer.window.add_dock_widget(routing, name=ROUTING_DOCK_NAME, area=area)
    return chat, routing


def answer_and_wait(
    chat: ChatWidget, question: str | None = None, timeout_s: float = 300.0
) -> AnswerRecord | None:
    """Send ``question`` (default: the report request) and run the Qt event loop until the
    answer is in and its stated findings are placed; returns its ``AnswerRecord`` or None (for
    scripted demos)."""
    import time

    from napari_tghmoe.conversation import REPORT_REQUEST

    if not chat.send(question or REPORT_REQUEST):
        return None
    deadline = time.perf_counter() + timeout_s

    def working() -> bool:
        return chat.is_busy or chat._load_worker is not None or chat.is_locating

    while working() and time.perf_counter() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    if chat.is_busy:
        chat.stop()
    return chat.latest_record()


def load_demo_volume(region: str = "chest", seed: int = 0) -> CTVolume:
    """The phantom the demo opens (small enough to start in a couple of seconds)."""
    from napari_tghmoe._sample_data import phantom_volume

    return phantom_volume(region, seed=seed)


def save_window_screenshot(viewer: Any, path: str | Path) -> Path:
    """Render every canvas and save the whole window (docks included) as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        QApplication.processEvents()
    image = viewer.screenshot(path=None, canvas_only=False, flash=False)
    from napari.utils.io import imsave

    imsave(str(path), image)
    return path


def launch(
    path: str | Path | None = None,
    *,
    screenshot: str | Path | None = None,
    region: str = "chest",
    window_size: tuple[int, int] = DEFAULT_WINDOW_SIZE,
) -> int:
    """Open napari with the CT reading layout; with ``screenshot``, save it and quit.

    Returns a process exit code (0 on success; 2 when ``path`` cannot be read).
    """
    import napari

    from napari_tghmoe.io._types import VolumeReadError

    if path is not None:
        from napari_tghmoe.io import load_volume

        try:
            volume = load_volume(path)
        except VolumeReadError as err:
            print(f"error: {err}")
            return 2
    else:
        volume = load_demo_volume(region)

    viewer = napari.Viewer(title="napari-tghmoe", show=True)
    _napari_private.main_qt_window(viewer).resize(*window_size)
    workspace = setup_viewer(viewer, volume)
    if screenshot is not None and workspace.bone_surface is not None:
        workspace.bone_surface.wait()  # the picture shows the bone surface
    # Chat + routing docks; a screenshot run uses a throw-away transcript.
    chat_options = {} if screenshot is None else {"autosave": False, "max_new_tokens": 48}
    chat, routing = dock_assistant(viewer, **chat_options)
    from napari_tghmoe._widgets.segment_dock import dock_segment

    dock_segment(viewer, area=CHAT_DOCK_AREA)  # a tab beside the chat and routing docks
    if screenshot is None:
        napari.run()
        return 0
    record = answer_and_wait(chat)  # "Generate report" to completion, then the overlay
    if record is not None and routing.trace is not None:
        routing.update_overlay(create=True)  # listed under Overlays, hidden until shown
    routing.wait_until_rendered()
    for _ in range(5):
        QApplication.processEvents()
    workspace.ortho_views.fit_all()
    out = save_window_screenshot(viewer, screenshot)
    print(f"screenshot saved to {out}")
    viewer.close()
    return 0

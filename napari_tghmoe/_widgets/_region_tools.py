"""The region a question is about: a box or a point the user marks on a plane view.

:class:`RegionTools` watches the Shapes and Points layers of the main viewer and of the
orthogonal plane views (each its own ``ViewerModel``). The newest rectangle or point drawn in
any of them is the *mark*, kept in world coordinates (mm), so it maps onto whichever CT layer
the chat asks about (:meth:`RegionTools.region_for`). "Box" and "Point" add a "region" layer on
the CT's grid to every plane view (to the main canvas when there are none) in the matching
drawing mode; one region at a time: a new one replaces the old. Helper layers of other docks
(crosshairs, finding points) are not regions.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from napari.layers import Points, Shapes
from qtpy.QtCore import QObject, Signal

from napari_tghmoe._widgets._viewer_dock import plane_viewer_models, unproxied
from napari_tghmoe.regions import Region
from napari_tghmoe.slice_context import AXIS_PLANE

#: Metadata key of the layers these tools add.
REGION_LAYER_KEY = "tghmoe_region"
#: Metadata key of layers that show places (finding points): never read as a region.
NOT_A_REGION_KEY = "tghmoe_not_a_region"
REGION_LAYER_NAME = "region"
REGION_COLOUR = "#00e5ff"
_NOT_REGION_PREFIXES = ("crosshair", "findings: ", "answer findings: ")
_MAIN = "main"


@dataclass(frozen=True)
class RegionMark:
    """A drawn box (its corner vertices) or a clicked point, in world coordinates (mm)."""

    kind: str  # "box" | "point"
    world: tuple[tuple[float, ...], ...]
    plane: str = ""  # the plane view it was drawn in ("" for the main canvas)


def _is_candidate(layer: Any) -> bool:
    if not isinstance(layer, (Shapes, Points)) or layer.ndim < 3:
        return False
    if layer.metadata.get(NOT_A_REGION_KEY):
        return False
    return not any(layer.name.startswith(prefix) for prefix in _NOT_REGION_PREFIXES)


def _finished(event: Any) -> bool:
    """A data event that ends a change ("added", "changed", "removed"), not one that announces it."""
    action = str(getattr(event, "action", "") or "").lower()
    return not action.endswith("ing")


def _last_item(layer: Any) -> tuple[str, np.ndarray] | None:
    """The newest rectangle / polygon (its vertices) or point of a layer, in its data coordinates."""
    if isinstance(layer, Shapes):
        if len(layer.data) == 0:
            return None
        return "box", np.asarray(layer.data[-1], dtype=float)
    data = np.asarray(layer.data, dtype=float)
    if data.size == 0:
        return None
    return "point", data[-1:].reshape(1, -1)


class RegionTools(QObject):
    """Finds the user's region marks in every view of one viewer; emits ``changed(mark | None)``."""

    changed = Signal(object)

    def __init__(self, viewer: Any, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._viewer_ref = weakref.ref(unproxied(viewer))
        self.mark: RegionMark | None = None
        self._source: Callable[[], Any] = lambda: None  # the layer the mark came from
        self._models: dict[int, tuple[str, Any]] = {}  # id(model) -> (plane, model)
        self._watched: dict[int, tuple[Any, Callable[..., None]]] = {}  # id(layer) -> (layer, slot)
        self._own: list[Callable[[], Any]] = []  # weak refs to the layers added here
        self._updating = False
        self.refresh()

    @property
    def viewer(self) -> Any:
        return self._viewer_ref()

    # ------------------------------------------------------------------ watching
    def _views(self) -> dict[str, Any]:
        viewer = self.viewer
        if viewer is None:
            return {}
        return {_MAIN: viewer, **plane_viewer_models(viewer)}

    def refresh(self) -> None:
        """Follow the layer lists of the main viewer and of every plane view that exists now."""
        for plane, model in self._views().items():
            if id(model) in self._models:
                continue
            self._models[id(model)] = (plane, model)
            model.layers.events.inserted.connect(self._on_inserted)
            model.layers.events.removed.connect(self._on_removed)
            for layer in list(model.layers):
                self._watch(layer, plane)

    def _plane_of(self, layer: Any) -> str:
        for plane, model in self._models.values():
            if layer in model.layers:
                return "" if plane == _MAIN else plane
        return ""

    def _on_inserted(self, event: Any) -> None:
        layer = event.value
        if self._watch(layer, self._plane_of(layer)) and not self._updating:
            if _last_item(layer) is not None:  # a layer added with its shape already in it
                self._take(layer)

    def _on_removed(self, event: Any) -> None:
        layer = event.value
        entry = self._watched.pop(id(layer), None)
        if entry is not None:
            layer.events.data.disconnect(entry[1])
        if self._source() is layer:
            self._set(None, None)

    def _watch(self, layer: Any, plane: str) -> bool:
        if not _is_candidate(layer) or id(layer) in self._watched:
            return id(layer) in self._watched
        layer_ref = weakref.ref(layer)

        def on_data(event: Any = None) -> None:
            source = layer_ref()
            if source is not None and not self._updating and _finished(event):
                self._take(source)

        layer.events.data.connect(on_data)
        self._watched[id(layer)] = (layer, on_data)
        return True

    def _take(self, layer: Any) -> None:
        """The newest item of ``layer`` becomes the mark (an emptied source clears it)."""
        item = _last_item(layer)
        if item is None:
            if self._source() is layer:
                self._set(None, None)
            return
        kind, vertices = item
        world = tuple(tuple(float(v) for v in layer.data_to_world(vertex)) for vertex in vertices)
        self._keep_only_newest(layer)
        self._set(RegionMark(kind, world, self._plane_of(layer)), layer)

    def _keep_only_newest(self, layer: Any) -> None:
        """One region at a time: the tools' own layers drop older marks (user layers are left as they are)."""
        self._updating = True
        try:
            for own in self._own_layers():
                keep = own is layer
                if isinstance(own, Shapes) and len(own.data) > (1 if keep else 0):
                    own.data = [own.data[-1]] if keep else []
                elif isinstance(own, Points) and len(own.data) > (1 if keep else 0):
                    own.data = np.asarray(own.data)[-1:] if keep else np.empty((0, own.ndim))
                if own.mode != "pan_zoom":
                    own.mode = "pan_zoom"  # drawn: clicks move the cursor again, in every view
        finally:
            self._updating = False

    def _set(self, mark: RegionMark | None, layer: Any) -> None:
        self.mark = mark
        self._source = weakref.ref(layer) if layer is not None else (lambda: None)
        self.changed.emit(mark)

    # ------------------------------------------------------------------ drawing
    def _own_layers(self) -> list[Any]:
        alive = [ref() for ref in self._own]
        return [layer for layer in alive if layer is not None]

    def start(self, kind: str, ct_layer: Any) -> str | None:
        """Let the user draw a ``"box"`` or click a ``"point"`` in the plane views (the main canvas
        when there are none); returns why not, or None."""
        if ct_layer is None:
            return "No CT layer: open a CT scan first."
        self.refresh()
        views = {plane: model for plane, model in self._views().items() if plane != _MAIN}
        if not views:
            viewer = self.viewer
            if viewer is None or viewer.dims.ndisplay != 2:
                return "Regions are drawn on a 2D view: open the plane views or switch the canvas to 2D."
            views = {_MAIN: viewer}
        wanted = Shapes if kind == "box" else Points
        for plane, model in views.items():
            layer = next(
                (l for l in model.layers if isinstance(l, wanted) and l.metadata.get(REGION_LAYER_KEY)), None
            )
            if layer is None:
                layer = self._new_layer(wanted, ct_layer, kind)
                self._updating = True
                try:
                    model.layers.append(layer)
                finally:
                    self._updating = False
                self._own.append(weakref.ref(layer))
            model.layers.selection.active = layer
            layer.mode = "add_rectangle" if kind == "box" else "add"
        return None

    def _new_layer(self, kind: type, ct_layer: Any, region_kind: str) -> Any:
        geometry = {
            "scale": tuple(ct_layer.scale),
            "translate": tuple(ct_layer.translate),
            "units": tuple(ct_layer.units),
            "name": f"{REGION_LAYER_NAME} {region_kind}",
            "metadata": {REGION_LAYER_KEY: True},
        }
        if kind is Shapes:
            return Shapes(ndim=3, edge_color=REGION_COLOUR, face_color="transparent", edge_width=1.0, **geometry)
        return Points(
            np.empty((0, 3)), ndim=3, size=6.0, face_color="transparent", border_color=REGION_COLOUR,
            symbol="cross", **geometry,
        )

    def clear(self) -> None:
        """Forget the region; the tools' own layers are emptied (user layers are left as they are)."""
        self._updating = True
        try:
            for own in self._own_layers():
                if len(own.data):
                    own.data = [] if isinstance(own, Shapes) else np.empty((0, own.ndim))
                own.mode = "pan_zoom"
        finally:
            self._updating = False
        self._set(None, None)

    # ------------------------------------------------------------------ the region on a CT
    def region_for(self, ct_layer: Any) -> Region:
        """The mark on ``ct_layer``'s voxel grid; ValueError (saying why) when there is none or it
        misses the layer."""
        mark = self.mark
        if mark is None:
            raise ValueError("no region is marked: draw a box or click a point on a plane view")
        voxels = np.array([ct_layer.world_to_data(point) for point in mark.world], dtype=float)[:, -3:]
        plane = mark.plane
        if not plane and mark.kind == "box":
            flat = np.flatnonzero(np.ptp(voxels, axis=0) < 0.5)
            plane = AXIS_PLANE.get(int(flat[0]), "") if len(flat) == 1 else ""
        try:
            return Region.from_voxels(mark.kind, voxels, np.shape(ct_layer.data), plane)
        except ValueError as err:
            raise ValueError(f"the {mark.kind} is not on {ct_layer.name!r}: {err}") from err

    # ------------------------------------------------------------------ teardown
    def disconnect(self) -> None:
        for layer, slot in list(self._watched.values()):
            try:
                layer.events.data.disconnect(slot)
            except Exception:
                pass
        self._watched.clear()
        for _plane, model in list(self._models.values()):
            for emitter, slot in (
                (model.layers.events.inserted, self._on_inserted),
                (model.layers.events.removed, self._on_removed),
            ):
                try:
                    emitter.disconnect(slot)
                except Exception:
                    pass
        self._models.clear()

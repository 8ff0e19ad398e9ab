"""A virtual patient built from analytic shapes in millimetres, rasterised on a CT grid.

One body model spans the pelvis to the lung apices; the region ("chest" or "abdomen")
only chooses which z window the scanner covers, so the same anatomy rules serve both.
Coordinates (mm): ``X`` towards the patient's left (0 = midline), ``Y`` towards posterior
(0 = body centre), ``Z`` towards superior (0 near the right diaphragm dome). Shapes are
painted inside their bounding boxes only, by broadcasting 1D coordinate vectors, so a
128x256x256 grid builds in a fraction of a second without per-voxel loops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from napari_tghmoe.phantom._types import LABEL_NAMES
from napari_tghmoe.phantom._types import LABEL_VALUES as L

#: Scanner z window (mm, virtual patient coordinates) per region: 320 mm of coverage.
REGION_Z_WINDOW = {"chest": (-90.0, 230.0), "abdomen": (-290.0, 30.0)}
#: Field of view needed to hold the largest body the generator draws, (z, y, x) in mm.
REGION_FOV_MM = {"chest": (320.0, 270.0, 360.0), "abdomen": (320.0, 270.0, 360.0)}

_NC, _ART, _PV, _DELAYED = 0, 1, 2, 3
_PHASE_INDEX = {"non-contrast": _NC, "arterial": _ART, "portal venous": _PV, "delayed": _DELAYED}

#: Mean HU per label and phase (non-contrast, arterial, portal venous).
HU_TABLE: dict[str, tuple[float, float, float]] = {
    "air": (-1000, -1000, -1000),
    "subcutaneous fat": (-105, -105, -105),
    "muscle": (45, 50, 58),
    "cortical bone": (1050, 1050, 1050),
    "cancellous bone": (420, 420, 420),
    "rib": (750, 750, 750),
    "visceral fat": (-95, -95, -95),
    "right upper lobe": (-850, -850, -850),
    "right middle lobe": (-850, -850, -850),
    "right lower lobe": (-850, -850, -850),
    "left upper lobe": (-850, -850, -850),
    "left lower lobe": (-850, -850, -850),
    "pulmonary vessels": (40, 260, 160),
    "airway": (-1000, -1000, -1000),
    "myocardium": (45, 120, 110),
    "cardiac blood pool": (42, 280, 160),
    "aorta": (42, 320, 160),
    "inferior vena cava": (40, 75, 150),
    "liver": (60, 75, 110),
    "spleen": (50, 125, 120),
    "right kidney": (52, 185, 170),
    "left kidney": (52, 185, 170),
    "pancreas": (45, 120, 100),
    "stomach": (25, 30, 35),
    "bowel": (20, 30, 40),
    "bowel gas": (-1000, -1000, -1000),
    "esophagus": (40, 55, 65),
    "spinal canal": (15, 15, 15),
    "intervertebral disc": (85, 85, 85),
    "lymph node": (40, 60, 80),
    "right pleural effusion": (10, 10, 12),
    "left pleural effusion": (10, 10, 12),
    "gallbladder": (10, 10, 10),
    "stomach gas": (-1000, -1000, -1000),
}


#: Delayed (equilibrium, ~3-5 min) phase: the labels that enhance, washed out below portal
#: venous (blood pool ~125 HU, liver ~95); every other label keeps its portal-venous value.
DELAYED_HU: dict[str, float] = {
    "muscle": 55,
    "pulmonary vessels": 120,
    "myocardium": 95,
    "cardiac blood pool": 125,
    "aorta": 125,
    "inferior vena cava": 125,
    "liver": 95,
    "spleen": 100,
    "right kidney": 150,
    "left kidney": 150,
    "pancreas": 85,
    "stomach": 33,
    "bowel": 38,
    "esophagus": 60,
    "lymph node": 72,
}


def _phase_hu(name: str, column: int) -> float:
    if column == _DELAYED:
        return float(DELAYED_HU.get(name, HU_TABLE[name][_PV]))
    return float(HU_TABLE[name][column])


def hu_lut(phase: str) -> np.ndarray:
    """Label value -> HU for one contrast phase (uint8 labels index it directly)."""
    lut = np.full(256, -1000.0, dtype=np.float32)
    column = _PHASE_INDEX[phase]
    for name in HU_TABLE:
        lut[L[name]] = _phase_hu(name, column)
    return lut


def organ_hu(name: str, phase: str) -> float:
    return _phase_hu(name, _PHASE_INDEX[phase])


@dataclass
class Canvas:
    """The CT grid: coordinate vectors in mm and the label map being painted."""

    z: np.ndarray  # (nz,) mm, superior positive
    y: np.ndarray  # (ny,) mm, posterior positive
    x: np.ndarray  # (nx,) mm, patient left positive
    labels: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.labels = np.zeros((self.z.size, self.y.size, self.x.size), dtype=np.uint8)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(abs(v[1] - v[0])) if v.size > 1 else 1.0 for v in (self.z, self.y, self.x))  # type: ignore[return-value]

    def index_of(self, point_xyz: tuple[float, float, float]) -> tuple[int, int, int] | None:
        """Nearest voxel (z, y, x) of a point in mm, or None outside the grid."""
        out = []
        for coord, axis in zip((point_xyz[2], point_xyz[1], point_xyz[0]), (self.z, self.y, self.x)):
            step = axis[1] - axis[0] if axis.size > 1 else 1.0
            idx = int(round((coord - axis[0]) / step))
            if not 0 <= idx < axis.size:
                return None
            out.append(idx)
        return tuple(out)  # type: ignore[return-value]

    def box(self, lo_xyz, hi_xyz) -> tuple[slice, slice, slice] | None:
        """Index slices (z, y, x) covering the mm box [lo, hi]; None if it misses the grid."""
        slices = []
        for lo, hi, axis in zip((lo_xyz[2], lo_xyz[1], lo_xyz[0]), (hi_xyz[2], hi_xyz[1], hi_xyz[0]), (self.z, self.y, self.x)):
            step = axis[1] - axis[0] if axis.size > 1 else 1.0
            start = max(int(np.ceil((lo - axis[0]) / step - 1e-6)), 0)
            stop = min(int(np.floor((hi - axis[0]) / step + 1e-6)) + 1, axis.size)
            if start >= stop:
                return None
            slices.append(slice(start, stop))
        return tuple(slices)  # type: ignore[return-value]

    def coords(self, sl: tuple[slice, slice, slice]):
        """Broadcastable Z, Y, X coordinate arrays of a box."""
        return (
            self.z[sl[0]][:, None, None],
            self.y[sl[1]][None, :, None],
            self.x[sl[2]][None, None, :],
        )

    def paint(
        self,
        lo_xyz,
        hi_xyz,
        inside: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
        label: int,
        over: np.ndarray | None = None,
    ) -> None:
        """Set ``label`` where ``inside(Z, Y, X)`` holds within the box (and, if given,
        where the current label is allowed by the boolean lookup ``over``)."""
        sl = self.box(lo_xyz, hi_xyz)
        if sl is None:
            return
        Z, Y, X = self.coords(sl)
        mask = np.broadcast_to(inside(Z, Y, X), tuple(s.stop - s.start for s in sl))
        region = self.labels[sl]
        if over is not None:
            mask = mask & over[region]
        region[mask] = label

    def ellipsoid(self, center, semi, label: int, over: np.ndarray | None = None) -> None:
        cx, cy, cz = center
        ax, ay, az = semi
        self.paint(
            (cx - ax, cy - ay, cz - az),
            (cx + ax, cy + ay, cz + az),
            lambda Z, Y, X: ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2 + ((Z - cz) / az) ** 2 <= 1.0,
            label,
            over,
        )

    def tube(self, points, radii, label: int, over: np.ndarray | None = None) -> None:
        """A polyline of capsules (x, y, z) with linearly tapering radius per segment."""
        pts = np.asarray(points, dtype=float)
        rad = np.broadcast_to(np.asarray(radii, dtype=float), (len(pts),))
        for p0, p1, r0, r1 in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
            r = max(r0, r1)
            lo = np.minimum(p0, p1) - r
            hi = np.maximum(p0, p1) + r
            d = p1 - p0
            length2 = float(d @ d) or 1e-9

            def inside(Z, Y, X, p0=p0, d=d, length2=length2, r0=r0, r1=r1):
                t = ((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / length2
                t = np.clip(t, 0.0, 1.0)
                dist2 = (X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2
                return dist2 <= (r0 + (r1 - r0) * t) ** 2

            self.paint(tuple(lo), tuple(hi), inside, label, over)


def allowed(*names: str) -> np.ndarray:
    """Boolean lookup over label values: may a shape paint over these labels?"""
    table = np.zeros(256, dtype=bool)
    for name in names:
        table[L[name]] = True
    return table


def not_over(*names: str) -> np.ndarray:
    table = ~allowed(*names)
    return table


LUNG_LABELS = ("right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe")
SOFT = ("subcutaneous fat", "muscle", "visceral fat")


@dataclass
class Anatomy:
    """Parameters of one virtual patient (mm), kept to place findings and describe them."""

    ax: float  # body semi-axis, x
    ay: float  # body semi-axis, y
    fat: float
    muscle: float
    cav_ax: float  # thoraco-abdominal cavity semi-axes and centre
    cav_ay: float
    cav_yc: float
    dome_right: float  # diaphragm dome heights (z)
    dome_left: float
    fissure_z0: float  # oblique fissure height at the cavity centre
    fissure_slope: float
    horizontal_fissure_z: float
    mediastinum_half_width: float
    carina_z: float
    liver_center: tuple[float, float, float]
    liver_semi: tuple[float, float, float]
    cantlie_x: float
    spleen_center: tuple[float, float, float]
    spleen_semi: tuple[float, float, float]
    kidney_centers: dict[str, tuple[float, float, float]]
    kidney_semi: tuple[float, float, float]
    aorta_xy_abdomen: tuple[float, float]

    def diaphragm_z(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Height of the diaphragm under each (X, Y): two domes, deep posterior recesses."""
        side_x = self.cav_ax * 0.5
        dome = np.where(X < 0, self.dome_right, self.dome_left)
        dx = (np.abs(X) - side_x) / (self.cav_ax * 0.62)
        dy = (Y - self.cav_yc + 10.0) / self.cav_ay
        return dome - 55.0 * (dx**2 + dy**2) - 22.0 * np.clip((Y - self.cav_yc) / self.cav_ay, 0.0, None)

    def lung_lobe_of(self, X, Y, Z) -> np.ndarray:
        """Lobe label value for points known to be lung (fissures are planes)."""
        upper = Z > self.fissure_z0 + self.fissure_slope * (Y - self.cav_yc)
        right = X < 0
        lobe = np.where(
            right,
            np.where(upper, np.where(Z > self.horizontal_fissure_z, L["right upper lobe"], L["right middle lobe"]), L["right lower lobe"]),
            np.where(upper, L["left upper lobe"], L["left lower lobe"]),
        )
        return lobe.astype(np.uint8)

    def liver_sector(self, X, Y) -> np.ndarray:
        """0 right anterior, 1 right posterior, 2 left lobe (Cantlie line, coronal split)."""
        posterior = Y > self.liver_center[1]
        return np.where(X > self.cantlie_x, 2, np.where(posterior, 1, 0))


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Random but plausible body dimensions and organ positions (mm)."""
    u = rng.uniform
    ax = 160.0 * u(0.92, 1.06)
    ay = 115.0 * u(0.92, 1.06)
    fat = u(12.0, 30.0)
    muscle = u(9.0, 14.0)
    cav_ax = ax - fat - muscle - 8.0
    cav_ay = ay - fat - muscle - 8.0
    cav_yc = -5.0
    dome_right = u(-8.0, 8.0)
    dome_left = dome_right - u(10.0, 20.0)
    liver_center = (-55.0 + u(-6, 6), cav_yc + 15.0 + u(-5, 5), dome_right - 75.0 + u(-8, 8))
    liver_semi = (min(85.0 * u(0.92, 1.08), cav_ax * 0.75), min(80.0 * u(0.92, 1.05), cav_ay * 1.05), 85.0 * u(0.9, 1.1))
    spleen_center = (min(85.0, cav_ax - 30.0), cav_yc + 42.0, dome_left - 82.0 + u(-8, 8))
    spleen_semi = (32.0 * u(0.9, 1.12), 48.0 * u(0.9, 1.12), 55.0 * u(0.9, 1.12))
    kidney_semi = (27.0 * u(0.92, 1.08), 24.0 * u(0.92, 1.08), 52.0 * u(0.92, 1.08))
    kidney_centers = {
        "right": (-66.0 + u(-4, 4), cav_yc + 50.0, dome_right - 165.0 + u(-10, 10)),
        "left": (66.0 + u(-4, 4), cav_yc + 48.0, dome_left - 148.0 + u(-10, 10)),
    }
    return Anatomy(
        ax=ax, ay=ay, fat=fat, muscle=muscle, cav_ax=cav_ax, cav_ay=cav_ay, cav_yc=cav_yc,
        dome_right=dome_right, dome_left=dome_left,
        fissure_z0=u(50.0, 68.0), fissure_slope=u(0.8, 1.0), horizontal_fissure_z=u(85.0, 100.0),
        mediastinum_half_width=u(26.0, 32.0), carina_z=u(110.0, 122.0),
        liver_center=liver_center, liver_semi=liver_semi, cantlie_x=liver_center[0] + 40.0,
        spleen_center=spleen_center, spleen_semi=spleen_semi,
        kidney_centers=kidney_centers, kidney_semi=kidney_semi,
        aorta_xy_abdomen=(12.0, 18.0),
    )


def paint_anatomy(cv: Canvas, a: Anatomy, rng: np.random.Generator) -> None:
    """Rasterise the virtual patient into ``cv.labels`` (order matters: later wins)."""
    lab = cv.labels
    Y2 = cv.y[:, None]
    X2 = cv.x[None, :]
    # Body wall: subcutaneous fat, muscle, cavity (flattened back on the table).
    body = ((X2 / a.ax) ** 2 + (Y2 / a.ay) ** 2 <= 1.0) & (Y2 < a.ay * 0.93)
    inner = (X2 / (a.ax - a.fat)) ** 2 + (Y2 / (a.ay - a.fat)) ** 2 <= 1.0
    cavity = (X2 / a.cav_ax) ** 2 + ((Y2 - a.cav_yc) / a.cav_ay) ** 2 <= 1.0
    plane = np.where(cavity, L["visceral fat"], np.where(inner & body, L["muscle"], np.where(body, L["subcutaneous fat"], L["air"])))
    lab[:] = plane.astype(np.uint8)[None]

    _paint_ribs_and_sternum(cv, a)
    _paint_lungs(cv, a)
    _paint_mediastinum(cv, a, rng)
    _paint_abdomen(cv, a, rng)
    _paint_spine(cv, a)


def _paint_ribs_and_sternum(cv: Canvas, a: Anatomy) -> None:
    Y2 = cv.y[:, None]
    X2 = cv.x[None, :]
    rho = np.sqrt((X2 / (a.cav_ax + 6.0)) ** 2 + ((Y2 - a.cav_yc) / (a.cav_ay + 6.0)) ** 2)
    ring = (np.abs(rho - 1.0) < 5.0 / (a.cav_ay + 6.0)) & (np.abs(X2) > 22.0)
    jj, ii = np.nonzero(ring)
    if jj.size == 0:
        return
    y_ring = cv.y[jj]
    # Ribs slope down anteriorly (~70 mm over the chest depth), 28 mm apart, 10 mm thick.
    centre_offset = 0.45 * (cv.y[jj] - a.cav_yc)
    phase = (cv.z[:, None] - centre_offset[None, :] - 3.0) % 28.0
    in_rib = (phase < 10.0) & (cv.z[:, None] > -110.0 + 0.3 * (y_ring[None, :] - a.cav_yc)) & (cv.z[:, None] < 205.0)
    kk, nn = np.nonzero(in_rib)
    current = cv.labels[kk, jj[nn], ii[nn]]
    keep = allowed(*SOFT)[current]
    cv.labels[kk[keep], jj[nn][keep], ii[nn][keep]] = L["rib"]
    # Sternum: anterior midline bone of the chest.
    y_st = a.cav_yc - a.cav_ay - 6.0
    cv.paint(
        (-16.0, y_st - 8.0, a.dome_right + 15.0),
        (16.0, y_st + 8.0, 200.0),
        lambda Z, Y, X: (X / 15.0) ** 2 + ((Y - y_st) / 7.0) ** 2 <= 1.0,
        L["rib"],
        allowed(*SOFT),
    )


def _paint_lungs(cv: Canvas, a: Anatomy) -> None:
    lo = (-a.cav_ax, a.cav_yc - a.cav_ay, min(a.dome_right, a.dome_left) - 90.0)
    hi = (a.cav_ax, a.cav_yc + a.cav_ay, 225.0)
    sl = cv.box(lo, hi)
    if sl is None:
        return
    Z, Y, X = cv.coords(sl)
    z_taper, z_apex = 60.0, 218.0
    side_x = a.cav_ax * 0.52
    s2 = 1.0 - (np.clip(Z - z_taper, 0.0, None) / (z_apex - z_taper)) ** 2  # apex taper
    in_cavity = (X / a.cav_ax) ** 2 + ((Y - a.cav_yc) / a.cav_ay) ** 2 <= 1.0
    apex = ((np.abs(X) - side_x) / (a.cav_ax * 0.55)) ** 2 + ((Y - a.cav_yc) / a.cav_ay) ** 2 <= s2
    lung = in_cavity & apex & (np.abs(X) > a.mediastinum_half_width) & (Z > a.diaphragm_z(X, Y))
    region = cv.labels[sl]
    lobes = a.lung_lobe_of(X, Y, Z)
    region[lung] = np.broadcast_to(lobes, lung.shape)[lung]
    # Diaphragm muscle: a 5 mm sheet under the lungs, within the cavity.
    sheet = in_cavity & (Z <= a.diaphragm_z(X, Y)) & (Z > a.diaphragm_z(X, Y) - 5.0) & (np.abs(X) > 15.0)
    region[sheet & (region == L["visceral fat"])] = L["muscle"]


def _paint_mediastinum(cv: Canvas, a: Anatomy, rng: np.random.Generator) -> None:
    yc = a.cav_yc
    lungs_fat = allowed(*LUNG_LABELS, "visceral fat", "muscle")
    # Heart on the left dome, wrapped in pericardial fat.
    h_scale = rng.uniform(0.92, 1.08)
    heart_c = (20.0, yc - 22.0, a.dome_left + 50.0 * h_scale)
    heart_s = (62.0 * h_scale, 47.0 * h_scale, 52.0 * h_scale)
    cv.ellipsoid(heart_c, tuple(s + 5.0 for s in heart_s), L["visceral fat"], allowed(*LUNG_LABELS))
    cv.ellipsoid(heart_c, heart_s, L["myocardium"], lungs_fat)
    cv.ellipsoid((heart_c[0] - 4.0, heart_c[1] - 2.0, heart_c[2] + 2.0), tuple(s - 11.0 for s in heart_s), L["cardiac blood pool"], allowed("myocardium"))
    heart_top = heart_c[2] + heart_s[2]
    # Airways: trachea to the carina, then the main bronchi (air inside a soft-tissue wall).
    carina = (0.0, yc + 8.0, a.carina_z)
    trachea = [(0.0, yc + 4.0, 260.0), carina]
    bronchus_r = [carina, (-46.0, yc + 14.0, a.carina_z - 28.0)]
    bronchus_l = [carina, (46.0, yc + 14.0, a.carina_z - 34.0)]
    not_bone = not_over("cortical bone", "cancellous bone", "rib", "air")
    for path, r in ((trachea, 9.0), (bronchus_r, 6.5), (bronchus_l, 6.0)):
        cv.tube(path, r + 2.0, L["muscle"], not_bone)
    for path, r in ((trachea, 9.0), (bronchus_r, 6.5), (bronchus_l, 6.0)):
        cv.tube(path, r, L["airway"], not_bone)
    # Pulmonary vessels: tapering branches from each hilum into its lung.
    hila = {-1: np.array([-42.0, yc + 10.0, a.carina_z - 30.0]), 1: np.array([42.0, yc + 10.0, a.carina_z - 35.0])}
    into_lung = allowed(*LUNG_LABELS)
    for side, hilum in hila.items():
        for _ in range(14):
            direction = np.array([side * rng.uniform(0.3, 1.0), rng.uniform(-0.9, 0.9), rng.uniform(-1.2, 0.9)])
            direction /= np.linalg.norm(direction)
            length = rng.uniform(45.0, 95.0)
            mid = hilum + direction * length * 0.55
            end = hilum + direction * length
            cv.tube([hilum, mid, end], [5.0, 3.5, 1.6], L["pulmonary vessels"], into_lung)
            for _ in range(2):
                branch_dir = direction + rng.normal(0.0, 0.5, 3)
                branch_dir /= np.linalg.norm(branch_dir)
                cv.tube([mid, mid + branch_dir * rng.uniform(25.0, 50.0)], [2.6, 1.2], L["pulmonary vessels"], into_lung)
    # Esophagus behind the trachea, down to the stomach.
    cv.tube([(4.0, yc + 28.0, 260.0), (10.0, yc + 26.0, a.dome_left - 10.0), (40.0, yc - 5.0, a.dome_left - 35.0)], 8.0, L["esophagus"], lungs_fat)
    # Aorta: root, ascending, arch, descending, abdominal, iliac arteries.
    ax_, ay_ = a.aorta_xy_abdomen
    aorta = [
        (10.0, yc - 24.0, heart_top - 35.0),
        (6.0, yc - 18.0, a.carina_z + 12.0),
        (14.0, yc + 10.0, a.carina_z + 30.0),
        (26.0, yc + 36.0, a.carina_z + 12.0),
        (26.0, yc + 36.0, a.dome_left - 25.0),
        (ax_, ay_, a.dome_left - 80.0),
        (ax_ - 2.0, ay_ - 4.0, -235.0),
    ]
    aorta_r = [14.0, 14.0, 13.0, 12.0, 12.0, 10.5, 9.5]
    vessel_over = not_over("cortical bone", "cancellous bone", "rib", "air", "airway", "subcutaneous fat")
    cv.tube(aorta, aorta_r, L["aorta"], vessel_over)
    for side in (-1, 1):
        cv.tube([(ax_ - 2.0, ay_ - 4.0, -235.0), (side * 48.0, ay_ - 2.0, -300.0)], [7.5, 7.0], L["aorta"], vessel_over)


def _paint_abdomen(cv: Canvas, a: Anatomy, rng: np.random.Generator) -> None:
    yc = a.cav_yc
    fat_only = allowed("visceral fat")
    below = lambda Z, Y, X: Z < a.diaphragm_z(X, Y) - 5.0  # noqa: E731
    in_cavity = lambda Y, X: (X / a.cav_ax) ** 2 + ((Y - yc) / a.cav_ay) ** 2 <= 1.0  # noqa: E731

    def organ(center, semi, label, over, extra=None, clip_to_cavity=True):
        cx, cy, cz = center
        sx, sy, sz = semi

        def inside(Z, Y, X):
            m = (((X - cx) / sx) ** 2 + ((Y - cy) / sy) ** 2 + ((Z - cz) / sz) ** 2 <= 1.0) & below(Z, Y, X)
            if clip_to_cavity:
                m &= in_cavity(Y, X)
            return m if extra is None else m & extra(Z, Y, X)

        cv.paint((cx - sx, cy - sy, cz - sz), (cx + sx, cy + sy, cz + sz), inside, label, over)

    # Bowel: colon frame and small-bowel loops in the lower abdomen (fluid or gas filled).
    colon = [(-95.0, yc - 5.0, -275.0), (-95.0, yc - 15.0, -135.0), (-30.0, yc - 45.0, -125.0), (40.0, yc - 45.0, -120.0), (95.0, yc - 10.0, -130.0), (92.0, yc + 5.0, -275.0)]
    cv.tube(colon, 19.0, L["bowel"], fat_only)
    for p0, p1 in zip(colon[:-1], colon[1:]):
        cv.tube([p0, p1], 14.0, L["bowel gas"] if rng.random() < 0.6 else L["bowel"], allowed("bowel"))
    for _ in range(40):
        c = (rng.uniform(-80, 80), rng.uniform(yc - 75, yc + 15), rng.uniform(-285, -140))
        s = tuple(rng.uniform(9.0, 16.0, 3))
        cv.ellipsoid(c, s, L["bowel"], fat_only)
        if rng.random() < 0.35:
            cv.ellipsoid(c, tuple(v * 0.55 for v in s), L["bowel gas"], allowed("bowel"))
    # Psoas muscles, growing towards the pelvis.
    for side in (-1, 1):
        cv.paint(
            (side * 38.0 - 25.0, 30.0, -300.0), (side * 38.0 + 25.0, 90.0, -100.0),
            lambda Z, Y, X, side=side: ((X - side * 40.0) ** 2 + (Y - 58.0) ** 2) <= (6.0 + 16.0 * np.clip((-110.0 - Z) / 150.0, 0.0, 1.0)) ** 2,
            L["muscle"], fat_only,
        )
    # Stomach (gas rises anteriorly in a supine patient), under the left dome.
    st_c = (55.0, yc - 12.0, a.dome_left - 45.0)
    st_s = (40.0, 34.0, 46.0)
    organ(st_c, st_s, L["stomach"], fat_only)
    organ(st_c, st_s, L["stomach gas"], allowed("stomach"), extra=lambda Z, Y, X: Y < st_c[1] - 14.0)
    # Pancreas across the spine, tail to the splenic hilum.
    organ((20.0, yc + 6.0, a.dome_left - 95.0), (62.0, 12.0, 14.0), L["pancreas"], allowed("visceral fat", "bowel"))
    # Liver: right lobe, left lobe across the midline; gallbladder under it.
    liver_over = allowed("visceral fat", "stomach", "stomach gas", "bowel", "bowel gas", "muscle")
    organ(a.liver_center, a.liver_semi, L["liver"], liver_over)
    lc = a.liver_center
    organ((lc[0] + 62.0, yc - 42.0, lc[2] + 22.0), (52.0, 30.0, 40.0), L["liver"], liver_over)
    organ((lc[0] + 28.0, yc - 45.0, lc[2] - 42.0), (14.0, 14.0, 27.0), L["gallbladder"], allowed("liver", "visceral fat"))
    # Spleen and kidneys (with renal sinus fat).
    organ(a.spleen_center, a.spleen_semi, L["spleen"], allowed("visceral fat", "stomach", "bowel", "bowel gas", "muscle"))
    for side, label in (("right", L["right kidney"]), ("left", L["left kidney"])):
        kc = a.kidney_centers[side]
        # Retroperitoneal: may lie against the posterior muscles, outside the cavity ellipse.
        organ(kc, a.kidney_semi, label, allowed("visceral fat", "bowel", "bowel gas", "spleen", "liver", "muscle"), clip_to_cavity=False)
        sign = -1.0 if side == "right" else 1.0
        organ((kc[0] - sign * 15.0, kc[1] - 4.0, kc[2]), (9.0, 9.0, a.kidney_semi[2] * 0.5), L["visceral fat"], allowed(LABEL_NAMES[label]))
    # Inferior vena cava: right of the aorta, through the back of the liver, into the heart.
    ivc = [(-24.0, yc + 24.0, -300.0), (-24.0, yc + 26.0, a.dome_right - 60.0), (-22.0, yc + 18.0, a.dome_right - 5.0), (-10.0, yc - 8.0, a.dome_right + 25.0)]
    cv.tube(ivc, 11.0, L["inferior vena cava"], not_over("cortical bone", "cancellous bone", "rib", "air", "aorta", "subcutaneous fat"))


def _paint_spine(cv: Canvas, a: Anatomy) -> None:
    """Vertebral bodies (cortex + cancellous), discs, canal, arch and spinous process."""
    sl = cv.box((-45.0, 20.0, -1e4), (45.0, a.ay, 1e4))
    if sl is None:
        return
    Z, Y, X = cv.coords(sl)
    t = np.clip((-60.0 - Z) / 60.0, 0.0, 1.0)  # 0 thoracic -> 1 lumbar
    y_body = 50.0 + 2.0 * t
    r_body = 15.0 + 5.0 * t
    disc = ((Z + 7.0) % 28.0) < 5.0
    r_xy = np.sqrt(X**2 + (Y - y_body) ** 2)
    body_m = r_xy <= r_body
    y_canal = y_body + r_body + 9.0
    r_canal = np.sqrt(X**2 + (Y - y_canal) ** 2)
    region = cv.labels[sl]
    shape = region.shape
    soft = allowed(*SOFT, "aorta", "inferior vena cava", "esophagus")[region]
    cortex = np.broadcast_to(body_m & (r_xy > r_body - 2.5) & ~disc, shape) & soft
    marrow = np.broadcast_to(body_m & (r_xy <= r_body - 2.5) & ~disc, shape) & soft
    discs = np.broadcast_to(body_m & disc, shape) & soft
    arch = np.broadcast_to((r_canal > 8.0) & (r_canal <= 14.0) & (Y > y_canal - 6.0) & ~disc, shape) & soft
    spinous = np.broadcast_to((np.abs(X) < 4.0) & (Y > y_canal + 8.0) & (Y < y_canal + 36.0) & ~disc, shape) & soft
    canal = np.broadcast_to(r_canal <= 8.0, shape)
    region[cortex | arch | spinous] = L["cortical bone"]
    region[marrow] = L["cancellous bone"]
    region[discs] = L["intervertebral disc"]
    region[canal] = L["spinal canal"]

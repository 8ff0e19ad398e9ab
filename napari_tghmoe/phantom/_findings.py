"""Place abnormalities in the virtual patient where their location words are true.

Each finding is drawn as (kind, location, size, HU) first, then a centre is searched by
rejection sampling: the centre and 32 points on a sphere a few millimetres larger than
the lesion must all lie in the organ and in the same lobe / segment / pole, so the words
in the report describe the whole lesion, not just its centre. Lesions are large (>= 10
mm) and differ from their organ by >= 50 HU, so they survive resampling to a coarse
model grid such as 32x256x256.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from napari_tghmoe.phantom._anatomy import LUNG_LABELS, Anatomy, Canvas, allowed, organ_hu
from napari_tghmoe.phantom._types import (
    ABDOMEN_NODE_STATIONS,
    CHEST_NODE_STATIONS,
    FINDING_KINDS,
    KIDNEY_ZONES,
    LIVER_SECTORS,
    LUNG_LOBES,
    PLEURAL_SPACES,
    SPLEEN_ZONES,
    Finding,
)
from napari_tghmoe.phantom._types import LABEL_VALUES as L

#: Organ groups (one finding at most per group and case) offered by each region.
REGION_ORGANS = {"chest": ("lung", "pleura", "lymph node"), "abdomen": ("liver", "kidney", "spleen", "lymph node")}
#: How many findings a case gets, 0..3.
COUNT_PROBABILITIES = (0.25, 0.35, 0.25, 0.15)


def _sphere_directions(n: int = 32) -> np.ndarray:
    """Evenly spread unit vectors (Fibonacci sphere) plus the six axis directions."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = np.pi * (1.0 + 5.0**0.5) * i
    fib = np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)
    axes = np.concatenate([np.eye(3), -np.eye(3)])
    return np.concatenate([fib, axes])


_DIRECTIONS = _sphere_directions()


def _labels_at(cv: Canvas, points_xyz: np.ndarray) -> np.ndarray:
    """Label at each (x, y, z) point; 255 for points outside the grid."""
    out = np.full(len(points_xyz), 255, dtype=np.int16)
    idx = []
    ok = np.ones(len(points_xyz), dtype=bool)
    for col, axis in ((2, cv.z), (1, cv.y), (0, cv.x)):
        step = axis[1] - axis[0] if axis.size > 1 else 1.0
        k = np.rint((points_xyz[:, col] - axis[0]) / step).astype(int)
        ok &= (k >= 0) & (k < axis.size)
        idx.append(np.clip(k, 0, axis.size - 1))
    out[ok] = cv.labels[idx[0][ok], idx[1][ok], idx[2][ok]]
    return out


def _search(
    cv: Canvas,
    rng: np.random.Generator,
    lo_xyz,
    hi_xyz,
    radius: float,
    ok_labels: np.ndarray,
    zone_of: Callable[[np.ndarray], np.ndarray],
    zone: object,
    margin: float = 4.0,
    tries: int = 600,
    zone_radius: float | None = None,
) -> np.ndarray | None:
    """A centre whose whole neighbourhood (radius + margin) is in ``ok_labels`` and whose
    sphere of ``zone_radius`` (default: radius + margin) is in ``zone``."""
    zone_radius = radius + margin if zone_radius is None else zone_radius
    lo = np.asarray(lo_xyz, dtype=float)
    hi = np.asarray(hi_xyz, dtype=float)
    if np.any(hi <= lo):
        return None
    candidates = lo + rng.random((tries, 3)) * (hi - lo)
    good = ok_labels[np.clip(_labels_at(cv, candidates), 0, 255)] & (zone_of(candidates) == zone)
    for centre in candidates[good]:
        shell = centre + _DIRECTIONS * (radius + margin)
        points = np.concatenate([shell, centre + _DIRECTIONS * radius * 0.5])
        labels = _labels_at(cv, points)
        if not np.all(ok_labels[np.clip(labels, 0, 255)] & (labels != 255)):
            continue
        if np.all(zone_of(np.concatenate([points, centre + _DIRECTIONS * zone_radius])) == zone):
            return centre
    return None


def _paint_ellipsoid(cv, hu, lesions, index, centre, semi, value, over, new_label=None) -> np.ndarray | None:
    """Write a lesion into the HU array (and lesion map); returns its voxel mask box."""
    cx, cy, cz = centre
    sx, sy, sz = semi
    sl = cv.box((cx - sx, cy - sy, cz - sz), (cx + sx, cy + sy, cz + sz))
    if sl is None:
        return None
    Z, Y, X = cv.coords(sl)
    mask = ((X - cx) / sx) ** 2 + ((Y - cy) / sy) ** 2 + ((Z - cz) / sz) ** 2 <= 1.0
    mask = mask & over[cv.labels[sl]]
    hu[sl][mask] = value
    lesions[sl][mask] = index + 1
    if new_label is not None:
        cv.labels[sl][mask] = new_label
    return mask


def place_findings(
    cv: Canvas, a: Anatomy, hu: np.ndarray, lesions: np.ndarray, region: str, phase: str, rng: np.random.Generator
) -> list[Finding]:
    """Choose 0-3 findings for the case and paint them; returns those that fit the grid."""
    organs = REGION_ORGANS[region]
    count = int(rng.choice(len(COUNT_PROBABILITIES), p=COUNT_PROBABILITIES))
    chosen = [str(o) for o in rng.choice(organs, size=count, replace=False)]
    # Effusions first: they replace lung, so nodules are then placed in aerated lung only.
    chosen.sort(key=lambda organ: organ != "pleura")
    findings: list[Finding] = []
    for organ in chosen:
        draw = _draw_finding(organ, region, phase, rng)
        placed = None
        for location in [draw["location"]] + [loc for loc in draw["alternatives"] if loc != draw["location"]]:
            draw["location"] = location
            placed = _place(cv, a, hu, lesions, len(findings), draw, phase, rng)
            if placed is not None:
                break
        if placed is not None:
            findings.append(placed)
    return findings


def _draw_finding(organ: str, region: str, phase: str, rng: np.random.Generator) -> dict:
    u = rng.uniform
    if organ == "lung":
        kind, locations, size = "lung nodule", LUNG_LOBES, u(10.0, 24.0)
        value = u(25.0, 50.0)
    elif organ == "pleura":
        kind, locations, size = "pleural effusion", PLEURAL_SPACES, u(15.0, 40.0)
        value = organ_hu("right pleural effusion", phase) + u(-3.0, 5.0)
    elif organ == "lymph node":
        kind = "enlarged lymph node"
        locations = CHEST_NODE_STATIONS if region == "chest" else ABDOMEN_NODE_STATIONS
        size = u(15.0, 24.0)
        value = organ_hu("lymph node", phase) + u(-5.0, 5.0)
    elif organ == "liver":
        liver = organ_hu("liver", phase)
        if rng.random() < 0.5:
            kind, value = "hypodense liver lesion", max(liver - u(55.0, 90.0), 5.0)
        else:
            kind, value = "hyperdense liver lesion", liver + u(60.0, 100.0)
        locations, size = LIVER_SECTORS, u(12.0, 32.0)
    elif organ == "kidney":
        kind, locations, size, value = "renal cyst", KIDNEY_ZONES, u(12.0, 22.0), u(-5.0, 2.0)
    elif organ == "spleen":
        spleen = organ_hu("spleen", phase)
        kind, locations, size = "hypodense splenic lesion", SPLEEN_ZONES, u(12.0, 24.0)
        value = max(spleen - u(55.0, 80.0), -5.0)
    else:  # pragma: no cover - REGION_ORGANS lists only the organs above
        raise ValueError(organ)
    assert FINDING_KINDS[kind][0] == organ
    location = str(locations[int(rng.integers(len(locations)))])
    alternatives = [str(loc) for loc in rng.permutation(np.asarray(locations, dtype=object))]
    return {"kind": kind, "organ": organ, "location": location, "alternatives": alternatives, "size": float(size), "hu": float(value)}


def _finding(draw: dict, centre_voxel, label: int, size: float | None = None) -> Finding:
    return Finding(
        kind=draw["kind"],
        organ=draw["organ"],
        location=draw["location"],
        size_mm=round(float(size if size is not None else draw["size"]), 1),
        center_voxel=tuple(int(v) for v in centre_voxel),  # type: ignore[arg-type]
        mean_hu=round(draw["hu"], 1),
        label=int(label),
    )


def _place(cv: Canvas, a: Anatomy, hu, lesions, index: int, draw: dict, phase: str, rng) -> Finding | None:
    kind, location = draw["kind"], draw["location"]
    radius = draw["size"] / 2.0
    if kind == "lung nodule":
        right = location.startswith("right")
        target = L[location]
        ok = allowed(*LUNG_LABELS, "pulmonary vessels")
        zone_of = lambda p: a.lung_lobe_of(p[:, 0], p[:, 1], p[:, 2])  # noqa: E731
        lo = (-a.cav_ax if right else a.mediastinum_half_width, a.cav_yc - a.cav_ay, min(a.dome_right, a.dome_left) - 60.0)
        hi = (-a.mediastinum_half_width if right else a.cav_ax, a.cav_yc + a.cav_ay, 215.0)
        centre = _search(cv, rng, lo, hi, radius, ok, zone_of, target, margin=5.0)
        if centre is None:
            return None
        semi = (radius, radius * rng.uniform(0.85, 1.0), radius * rng.uniform(0.85, 1.0))
        # The nodule belongs to its lobe, including where it engulfs a vessel.
        _paint_ellipsoid(cv, hu, lesions, index, centre, semi, draw["hu"], ok, new_label=target)
        return _finding(draw, cv.index_of(tuple(centre)), target)
    if kind in ("hypodense liver lesion", "hyperdense liver lesion"):
        sector = LIVER_SECTORS.index(location)
        ok = allowed("liver")
        zone_of = lambda p: a.liver_sector(p[:, 0], p[:, 1])  # noqa: E731
        c, s = np.asarray(a.liver_center), np.asarray(a.liver_semi)
        lo, hi = c - s, c + s + np.array([110.0, 0.0, 30.0])
        centre = _search(cv, rng, lo, hi, radius, ok, zone_of, sector, margin=4.0)
        if centre is None:
            return None
        semi = (radius * rng.uniform(0.85, 1.0), radius * rng.uniform(0.85, 1.0), radius)
        _paint_ellipsoid(cv, hu, lesions, index, centre, semi, draw["hu"], ok)
        return _finding(draw, cv.index_of(tuple(centre)), L["liver"])
    if kind == "renal cyst":
        # Cysts may bulge out of the renal contour (exophytic), as they often do: the
        # inner two thirds must be kidney, the whole cyst must stay in the named pole.
        side = "right" if location.startswith("right") else "left"
        zone_name = location.split(", ")[1]
        label = L[f"{side} kidney"]
        kc, ks = np.asarray(a.kidney_centers[side]), np.asarray(a.kidney_semi)

        def zone_of(p):
            rel = (p[:, 2] - kc[2]) / ks[2]
            return np.where(rel > 0.3, 0, np.where(rel < -0.3, 2, np.where(np.abs(rel) < 0.3, 1, -1)))

        zone = ("upper pole", "interpolar region", "lower pole").index(zone_name)
        kidney = allowed(f"{side} kidney")
        centre = _search(cv, rng, kc - ks, kc + ks, radius * 0.65, kidney, zone_of, zone, margin=0.0, zone_radius=radius)
        if centre is None:
            return None
        semi = (radius * rng.uniform(0.9, 1.0), radius * rng.uniform(0.9, 1.0), radius)
        _paint_ellipsoid(cv, hu, lesions, index, centre, semi, draw["hu"], allowed(f"{side} kidney", "visceral fat"))
        return _finding(draw, cv.index_of(tuple(centre)), label)
    if kind == "hypodense splenic lesion":
        sc, ss = np.asarray(a.spleen_center), np.asarray(a.spleen_semi)
        zone = SPLEEN_ZONES.index(location)
        zone_of = lambda p: np.where(p[:, 2] > sc[2], 0, 1)  # noqa: E731
        centre = _search(cv, rng, sc - ss, sc + ss, radius, allowed("spleen"), zone_of, zone, margin=3.0)
        if centre is None:
            return None
        semi = (radius * rng.uniform(0.85, 1.0), radius * rng.uniform(0.85, 1.0), radius)
        _paint_ellipsoid(cv, hu, lesions, index, centre, semi, draw["hu"], allowed("spleen"))
        return _finding(draw, cv.index_of(tuple(centre)), L["spleen"])
    if kind == "pleural effusion":
        return _place_effusion(cv, a, hu, lesions, index, draw)
    if kind == "enlarged lymph node":
        return _place_node(cv, a, hu, lesions, index, draw, rng)
    raise ValueError(kind)  # pragma: no cover


def _place_effusion(cv: Canvas, a: Anatomy, hu, lesions, index: int, draw: dict) -> Finding | None:
    """Free fluid layers in the dependent (posterior) hemithorax up to a horizontal level."""
    right = draw["location"].startswith("right")
    side_lobes = LUNG_LABELS[:3] if right else LUNG_LABELS[3:]
    x_lo, x_hi = (-a.cav_ax, 0.0) if right else (0.0, a.cav_ax)
    sl = cv.box((x_lo, a.cav_yc - a.cav_ay, -1e4), (x_hi, a.cav_yc + a.cav_ay, 1e4))
    if sl is None:
        return None
    region = cv.labels[sl]
    lung = allowed(*side_lobes, "pulmonary vessels")[region]
    if lung.sum() < 50:
        return None
    Y = cv.y[sl[1]][None, :, None]
    lung_rows = np.nonzero(lung.any(axis=(0, 2)))[0]
    y_back = float(cv.y[sl[1]][lung_rows.max()])
    depth = draw["size"]
    fluid = lung & (Y > y_back - depth)
    count = int(fluid.sum())
    if count < 30:
        return None
    label = L["right pleural effusion" if right else "left pleural effusion"]
    hu[sl][fluid] = draw["hu"]
    lesions[sl][fluid] = index + 1
    region[fluid] = label
    kk, jj, ii = np.nonzero(fluid)
    mean = np.array([kk.mean(), jj.mean(), ii.mean()])
    # The centre: the fluid voxel nearest the centroid, weighted to the deepest rows.
    deepest = jj >= np.percentile(jj, 60)
    pick = np.argmin(((np.stack([kk, jj, ii], 1)[deepest] - mean) ** 2).sum(1))
    centre = (kk[deepest][pick] + sl[0].start, jj[deepest][pick] + sl[1].start, ii[deepest][pick] + sl[2].start)
    return _finding(draw, centre, label)


_NODE_OVER = ("visceral fat", "muscle", "esophagus", "bowel", "bowel gas", *LUNG_LABELS, "pulmonary vessels")


def _place_node(cv: Canvas, a: Anatomy, hu, lesions, index: int, draw: dict, rng) -> Finding | None:
    """An enlarged node at its station, displacing fat (never vessels, airway or organs)."""
    u = rng.uniform
    yc = a.cav_yc
    radius = draw["size"] / 2.0
    over = allowed(*_NODE_OVER)
    for _ in range(20):
        station = draw["location"]
        if station == "right paratracheal region":
            c = (-24.0 + u(-3, 3), yc - 6.0 + u(-4, 4), a.carina_z + u(20.0, 45.0))
        elif station == "subcarinal region":
            c = (2.0 + u(-3, 3), yc + 10.0 + u(-3, 3), a.carina_z - 22.0 + u(-5, 5))
        elif station == "left hilar region":
            c = (50.0 + u(-4, 4), yc + 2.0 + u(-5, 5), a.carina_z - 45.0 + u(-8, 8))
        elif station == "left para-aortic region":
            c = (a.aorta_xy_abdomen[0] + 24.0 + u(0, 5), a.aorta_xy_abdomen[1] + u(-4, 4), u(-225.0, -195.0))
        elif station == "mesenteric root":
            c = (u(-8, 8), yc - 12.0 + u(-4, 4), u(-150.0, -128.0))
        else:  # pragma: no cover
            raise ValueError(station)
        centre_voxel = cv.index_of(c)
        if centre_voxel is None or not over[cv.labels[centre_voxel]]:
            continue
        semi = (radius, radius * u(0.9, 1.0), radius * u(1.1, 1.35))
        mask = _paint_ellipsoid(cv, hu, lesions, index, c, semi, draw["hu"], over, new_label=L["lymph node"])
        if mask is None or mask.sum() == 0:
            continue
        return _finding(draw, centre_voxel, L["lymph node"])
    return None

"""The 3D view's bone surface as a triangle mesh (``main_window.bone_mesh``), without a viewer.

Why a mesh: ray-casting the full CT for the bone iso-surface cost 3-4.5 s per 3D repaint on a
600 x 512 x 512 CT without a GPU; the mesh comes from a block-mean copy and must still sit on
the bone of the full-resolution CT, in its voxel coordinates.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_tghmoe._widgets.main_window import block_mean, bone_mesh, mesh_factors
from napari_tghmoe.layers import BONE_ISO_THRESHOLD_HU


def _bone_ball(shape=(60, 64, 64), radius_vox=18.0, centre=(29.0, 31.5, 33.0)) -> np.ndarray:
    """A 700 HU ball in 40 HU soft tissue, int16 as CT is."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    inside = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius_vox**2
    return np.where(inside, 700, 40).astype(np.int16)


def test_block_mean_is_the_mean_of_each_block_edge_blocks_padded():
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1500, size=(7, 10, 9)).astype(np.int16)  # no axis a multiple of its factor
    factors = (3, 4, 2)
    out = block_mean(data, factors, chunk_blocks=1)
    padded = np.pad(data, ((0, 2), (0, 2), (0, 1)), mode="edge").astype(float)
    assert out.shape == (3, 3, 5) and out.dtype == np.float32
    for k in range(3):
        for j in range(3):
            for i in range(5):
                block = padded[3 * k : 3 * k + 3, 4 * j : 4 * j + 4, 2 * i : 2 * i + 2]
                assert out[k, j, i] == pytest.approx(block.mean(), abs=1e-3)


def test_factors_aim_at_1_4_mm_blocks_and_cap_the_copy():
    # the large benchmark CT: 0.8 x 0.7 x 0.7 mm -> about 1.4-2.4 mm blocks, at most 16 M voxels
    factors = mesh_factors((600, 512, 512), (0.8, 0.7, 0.7))
    assert np.prod(np.ceil(np.array([600, 512, 512]) / factors)) <= 16_000_000
    assert all(f >= 2 for f in factors)
    # thick slices are never averaged along z; thin in-plane pixels are
    assert mesh_factors((64, 360, 480), (5.0, 0.75, 0.75)) == (1, 2, 2)
    assert mesh_factors((20, 48, 64), (3.0, 1.0, 1.0)) == (1, 1, 1)


def test_the_mesh_lies_on_the_bone_of_the_full_resolution_ct():
    hu = _bone_ball()
    centre, radius = np.array([29.0, 31.5, 33.0]), 18.0
    mesh = bone_mesh(hu, (0.7, 0.7, 0.7))
    assert mesh.factors == (2, 2, 2)  # 0.7 mm voxels: 1.4 mm blocks
    assert mesh.n_triangles > 0 and mesh.faces.max() < len(mesh.vertices)
    # in the CT's voxel coordinates, on the ball's boundary within one block
    distance = np.linalg.norm(mesh.vertices - centre, axis=1)
    assert np.all(np.abs(distance - radius) <= 2.0), (distance.min(), distance.max())
    # every vertex has bone and soft tissue of the full-resolution CT within one block of it
    for vertex in mesh.vertices[:: max(1, len(mesh.vertices) // 200)]:
        low = np.maximum(np.floor(vertex - 2).astype(int), 0)
        high = np.minimum(np.ceil(vertex + 2).astype(int) + 1, hu.shape)
        around = hu[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
        assert around.min() < BONE_ISO_THRESHOLD_HU < around.max(), vertex
    # normals point out of the bone (they light the surface)
    outward = np.sum(mesh.normals * (mesh.vertices - centre), axis=1)
    assert np.mean(outward > 0) > 0.99
    np.testing.assert_allclose(np.linalg.norm(mesh.normals, axis=1), 1.0, atol=1e-4)


def test_too_many_triangles_coarsens_the_copy():
    hu = _bone_ball()
    fine = bone_mesh(hu, (0.7, 0.7, 0.7))
    capped = bone_mesh(hu, (0.7, 0.7, 0.7), max_triangles=fine.n_triangles // 3)
    assert capped.n_triangles <= fine.n_triangles // 3
    assert np.prod(capped.factors) > np.prod(fine.factors)
    distance = np.linalg.norm(capped.vertices - np.array([29.0, 31.5, 33.0]), axis=1)
    assert np.all(np.abs(distance - 18.0) <= 3.0 * max(capped.factors))  # still on the ball


def test_a_ct_without_bone_gives_an_empty_mesh():
    mesh = bone_mesh(np.full((10, 20, 20), 40, dtype=np.int16), (1.0, 1.0, 1.0))
    assert mesh.n_triangles == 0 and mesh.vertices.shape == (0, 3)

"""Tests of dpvae.solver: exact recovery, noise robustness, landmarks, out-of-sample placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from dpvae import solver
from dpvae.solver import classical_mds, impute, knn_mean, reconstruct, smacof

_EXACT = "donot_use_mm_for_euclid_dist"


def _config(n: int, dim: int, seed: int) -> Tensor:
    """Random float64 configuration in a 10-unit box."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, dim, generator=g, dtype=torch.float64) * 10.0


def _embed(x: Tensor, latent_dim: int = 16, scale: float = 1.0, seed: int = 1) -> Tensor:
    """``scale * x @ Q^T`` for an orthonormal (latent_dim, d) map Q: distances times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(latent_dim, x.shape[1], generator=g, dtype=torch.float64))
    return scale * x @ q.T


def _rigid_error(x: Tensor, y: Tensor) -> float:
    """||R x_c - y_c||_F / ||y_c||_F after the best rotation/reflection (no scaling)."""
    x = x.to(torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    u, _, vt = torch.linalg.svd(xc.T @ yc)
    return float((xc @ (u @ vt) - yc).norm() / yc.norm())


def _stress(x: Tensor, D: Tensor) -> float:
    """Raw stress sum_{i<j} (||x_i - x_j|| - D_ij)^2."""
    return float(0.5 * (torch.cdist(x, x) - D).square().sum())


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_reconstruct_exact_distances(dim: int, scale: float) -> None:
    x = _config(200, dim, seed=dim)
    out = reconstruct(_embed(x, scale=scale), dim, scale=scale)
    assert out.shape == (200, dim)
    assert _rigid_error(out, x) < 1e-3  # rigid: also checks the scale was divided out


def test_reconstruct_wrong_scale_is_not_rigidly_equal() -> None:
    x = _config(100, 2, seed=0)
    out = reconstruct(_embed(x, scale=2.0), 2, scale=1.0)
    assert _rigid_error(out, x) > 0.3


@pytest.mark.parametrize("n", [300, 1500])  # full eigh and subspace-iteration paths
def test_classical_mds_exact_and_deterministic(n: int) -> None:
    x = _config(n, 2, seed=3)
    D = torch.cdist(x, x, compute_mode=_EXACT)
    out = classical_mds(D, 2)
    assert torch.allclose(torch.cdist(out, out, compute_mode=_EXACT), D, atol=1e-8)
    assert torch.equal(out, classical_mds(D, 2))
    assert out.dtype == D.dtype
    # centred, principal axes: orthogonal columns, the larger spread first
    assert float(out.mean(0).abs().max()) < 1e-9
    gram = out.T @ out
    assert abs(float(gram[0, 1])) < 1e-6 * float(gram[1, 1])
    assert float(gram[0, 0]) > float(gram[1, 1])
    # sign convention: each column's entry of largest magnitude is positive
    pivot = out.abs().argmax(0)
    assert bool((out[pivot, torch.arange(2)] > 0).all())
    # ... which makes the output a function of the points, not of their order or of the signs the
    # eigensolver happens to return: permuting the points permutes the rows, nothing else
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    permuted = classical_mds(D[perm][:, perm], 2)
    assert torch.allclose(permuted, out[perm], atol=1e-6)


def test_smacof_noisy_distances_bounded_error() -> None:
    x = _config(200, 2, seed=4)
    D = torch.cdist(x, x)
    g = torch.Generator().manual_seed(5)
    noise = 1.0 + 0.05 * torch.randn(200, 200, generator=g, dtype=torch.float64)
    noisy = torch.triu(D * noise, diagonal=1)
    noisy = noisy + noisy.T
    start = classical_mds(noisy, 2)
    out = smacof(noisy, start)
    assert _stress(out, noisy) < _stress(start, noisy)
    assert _rigid_error(out, x) < 0.05
    assert _rigid_error(out, x) > 1e-4  # really noisy


def test_smacof_weighted_recovers_with_missing_pairs() -> None:
    x = _config(150, 2, seed=6)
    D = torch.cdist(x, x)
    g = torch.Generator().manual_seed(7)
    w = (torch.rand(150, 150, generator=g) > 0.3).to(torch.float64)
    w = torch.triu(w, 1)
    w = w + w.T
    start = x + 0.3 * torch.randn(150, 2, generator=g, dtype=torch.float64)
    out = smacof(D, start, weights=w, n_iter=500, tol=1e-12)
    assert _rigid_error(out, x) < 1e-3
    unweighted = smacof(D, start, n_iter=50)
    ones = smacof(D, start, weights=torch.ones(150, 150, dtype=torch.float64), n_iter=50)
    assert _rigid_error(ones, unweighted) < 1e-8  # V^+ path equals the closed form


def test_reconstruct_landmarks_linear_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _config(3000, 2, seed=8)
    calls: list[tuple[int, int]] = []
    real_cdist = torch.cdist

    def spy(a: Tensor, b: Tensor, *args, **kwargs) -> Tensor:
        calls.append((a.shape[-2], b.shape[-2]))
        return real_cdist(a, b, *args, **kwargs)

    monkeypatch.setattr(solver.torch, "cdist", spy)
    out = reconstruct(_embed(x, scale=2.0), 2, scale=2.0, landmarks=300, chunk_size=512)
    monkeypatch.undo()
    assert _rigid_error(out, x) < 1e-3
    assert calls and max(a * b for a, b in calls) <= 512 * 300  # never n x n


def test_reconstruct_landmarks_noisy_latent_bounded() -> None:
    x = _config(3000, 2, seed=9)
    z = _embed(x)
    g = torch.Generator().manual_seed(10)
    z = z * (1.0 + 0.02 * torch.randn(z.shape[0], 1, generator=g, dtype=torch.float64))
    out = reconstruct(z, 2, landmarks=300)
    assert _rigid_error(out, x) < 0.05


def test_reconstruct_seed_and_dtype() -> None:
    x = _config(800, 2, seed=11)
    z = _embed(x).float()
    a = reconstruct(z, 2, landmarks=200, seed=3)
    b = reconstruct(z, 2, landmarks=200, seed=3)
    c = reconstruct(z, 2, landmarks=200, seed=4)
    assert a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert _rigid_error(c, x) < 1e-3


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_impute_exact_distances(scale: float) -> None:
    x = _config(1500, 2, seed=12)
    z = _embed(x, scale=scale)
    ref, query = slice(0, 1000), slice(1000, None)
    out = impute(z[query], z[ref], x[ref], scale=scale)
    spacing = 10.0 / 1000**0.5
    assert float((out - x[query]).norm(dim=1).max()) < 1e-3 * spacing
    start = knn_mean(z[query], z[ref], x[ref])
    assert float((start - x[query]).norm(dim=1).median()) > 0.05 * spacing  # refinement matters


def test_impute_noisy_latent_beats_neighbour_mean() -> None:
    x = _config(3000, 2, seed=15)
    z = _embed(x, scale=2.0)
    g = torch.Generator().manual_seed(16)
    z = z + 0.01 * torch.randn(z.shape, generator=g, dtype=torch.float64)  # ~0.03 spacings
    out = impute(z[2000:], z[:2000], x[:2000], scale=2.0)
    start = knn_mean(z[2000:], z[:2000], x[:2000])
    err = float((out - x[2000:]).norm(dim=1).median())
    assert err < 0.5 * float((start - x[2000:]).norm(dim=1).median())
    assert err < 0.05 * (10.0 / 2000**0.5)


def test_impute_3d_and_wrong_scale() -> None:
    x = _config(1200, 3, seed=13)
    z = _embed(x, scale=2.0)
    out = impute(z[800:], z[:800], x[:800], scale=2.0, k=12)
    assert float((out - x[800:]).norm(dim=1).max()) < 1e-6
    wrong = impute(z[800:], z[:800], x[:800], scale=1.0, k=12)
    assert float((wrong - x[800:]).norm(dim=1).median()) > 0.1


def test_impute_chunking_and_dtypes() -> None:
    x = _config(600, 2, seed=14)
    z = _embed(x)
    a = impute(z[400:], z[:400], x[:400], chunk_size=4096)
    b = impute(z[400:], z[:400], x[:400], chunk_size=37)
    assert torch.allclose(a, b, atol=1e-12)
    f = impute(z[400:].float(), z[:400].float(), x[:400].float())
    assert f.dtype == torch.float32
    assert torch.allclose(f.double(), a, atol=1e-3)
    assert torch.equal(
        impute(z[400:], z[:400], x[:400], n_iter=0), knn_mean(z[400:], z[:400], x[:400])
    )
    assert impute(z[:0], z[:400], x[:400]).shape == (0, 2)


def test_knn_mean_hand_checked() -> None:
    ref_latent = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    ref_coords = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [9.0, 9.0]])
    query = torch.tensor([[0.5], [3.0]])
    out = knn_mean(query, ref_latent, ref_coords, k=2)
    # query 0.5: neighbours 0 and 1 at distance 0.5 each -> plain mean
    assert torch.allclose(out[0], torch.tensor([1.0, 0.0]))
    # query 3.0 coincides with reference 2 -> its coordinates
    assert torch.allclose(out[1], torch.tensor([0.0, 4.0]), atol=1e-6)
    out3 = knn_mean(torch.tensor([[2.0]]), ref_latent, ref_coords, k=3)
    w = torch.tensor([1 / 2.0, 1 / 1.0, 1 / 1.0])  # distances 2, 1, 1 to refs 0, 1, 2
    expected = (w[:, None] * ref_coords[:3]).sum(0) / w.sum()
    assert torch.allclose(out3[0], expected)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: classical_mds(torch.zeros(3, 4), 2), "square"),
        (lambda: classical_mds(torch.zeros(3, 3), 4), "dim"),
        (lambda: smacof(torch.zeros(3, 3), torch.zeros(4, 2)), "one row per point"),
        (
            lambda: smacof(torch.zeros(3, 3), torch.zeros(3, 2), weights=-torch.ones(3, 3)),
            "non-neg",
        ),
        (lambda: reconstruct(torch.zeros(5), 2), "2-D"),
        (lambda: reconstruct(torch.zeros(5, 3), 2, scale=0.0), "scale"),
        (lambda: reconstruct(torch.full((5, 3), float("nan")), 2), "non-finite"),
        (lambda: impute(torch.zeros(2, 3), torch.zeros(5, 4), torch.zeros(5, 2)), "latent size"),
        (lambda: impute(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(4, 2)), "one row per"),
        (lambda: impute(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(5, 2), k=6), "k"),
        (lambda: knn_mean(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(5, 2), k=0), "k"),
    ],
)
def test_validation_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_joint_space_scales_each_part_to_unit_spread() -> None:
    from dpvae.placement import joint_space

    gen = torch.Generator().manual_seed(0)
    zr, zq = torch.randn(50, 4, generator=gen) * 7.0, torch.randn(5, 4, generator=gen)
    er, eq = torch.randn(50, 3, generator=gen) * 0.01, torch.randn(5, 3, generator=gen)
    jr, jq = joint_space(zr, zq, er, eq, weight=2.0)
    assert jr.shape == (50, 7) and jq.shape == (5, 7)

    def spread(x: torch.Tensor) -> float:
        return float((x - x.mean(0)).pow(2).sum(1).mean().sqrt())

    assert spread(jr[:, :4]) == pytest.approx(1.0) and spread(jr[:, 4:]) == pytest.approx(2.0)
    # the query is scaled with the reference's spreads, not its own
    torch.testing.assert_close(jq[:, :4], zq / spread(zr))
    # without extra features or with weight 0: the latent codes unchanged
    assert joint_space(zr, zq)[0] is zr
    assert joint_space(zr, zq, er, eq, weight=0.0)[1] is zq


def test_calibrate_in_sample_matches_held_out_spread() -> None:
    """Training rows spread twice as wide as held-out rows: they are scaled about their own mean
    to the held-out spread; held-out rows are untouched; a narrower in-sample set is not enlarged."""
    from dpvae.placement import calibrate_in_sample

    rng = np.random.default_rng(0)
    held_out = rng.normal(size=(200, 4))
    train = 5.0 + 2.0 * rng.normal(size=(800, 4))
    latent = np.vstack([train, held_out])
    in_sample = np.arange(1000) < 800
    out, scale = calibrate_in_sample(latent, in_sample)

    def spread(x: np.ndarray) -> float:
        return float(np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()))

    assert 0.45 < scale < 0.55
    assert spread(out[in_sample]) == pytest.approx(spread(held_out), rel=1e-9)
    np.testing.assert_allclose(out[in_sample].mean(0), train.mean(0), atol=1e-12)
    np.testing.assert_array_equal(out[~in_sample], held_out)
    assert latent[0, 0] == train[0, 0]  # the input is not modified
    same, one = calibrate_in_sample(
        np.vstack([held_out[:100], 2 * held_out[100:]]), np.arange(200) < 100
    )
    assert one == 1.0 and np.array_equal(same[:100], held_out[:100])
    # torch tensors give the same result
    t_out, t_scale = calibrate_in_sample(torch.as_tensor(latent), torch.as_tensor(in_sample))
    np.testing.assert_allclose(t_out.numpy(), out, atol=1e-10)
    assert t_scale == pytest.approx(scale)


def test_knn_mean_and_impute_reuse_a_built_index() -> None:
    """An index built once over the reference gives what each call's own index gives."""
    from dpvae.neighbours import NeighbourIndex

    x = _config(900, 2, seed=21)
    z = _embed(x)
    index = NeighbourIndex(z[:600])
    assert torch.equal(
        knn_mean(z[600:], z[:600], x[:600], k=8, index=index),
        knn_mean(z[600:], z[:600], x[:600], k=8),
    )
    assert torch.equal(
        impute(z[600:], z[:600], x[:600], n_iter=5, index=index),
        impute(z[600:], z[:600], x[:600], n_iter=5),
    )

"""`resize` matches PyTorch's `F.interpolate(align_corners=False)` / adaptive pooling.

PyTorch computes source coordinates in float32, our matrices in float64; for non-dyadic
ratios the interpolation weights therefore differ by up to ~3e-6 (PyTorch's rounding): the
bound is 1e-5 of the largest reference value (4e-6 measured at most).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from numerics import assert_close  # noqa: E402

from step_jax.models import resize  # noqa: E402

# (n_in, n_out): up- and down-sampling, integer and non-integer ratios, identity, tiny.
SIZES = [(14, 32), (32, 14), (7, 12), (12, 7), (14, 14), (1, 5), (5, 1), (2, 3), (16, 20),
         (30, 8), (9, 24)]


def _torch_resize(x, out_hw, mode):
  """x [H, W, C] numpy → torch F.interpolate over H, W → [h, w, C] numpy."""
  t = torch.from_numpy(x).permute(2, 0, 1)[None]
  kw = {} if mode == "area" else dict(align_corners=False)
  return F.interpolate(t, size=tuple(out_hw), mode=mode, **kw)[0].permute(1, 2, 0).numpy()


def _data(rng_seed, shape):
  return np.random.default_rng(rng_seed).uniform(-1, 1, size=shape).astype(np.float32)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_interp_matrix_equals_torch_operator(method, n_in, n_out):
  # Resizing the identity (n_in channels, one-hot along H) gives PyTorch's matrix.
  eye = torch.eye(n_in)[None, :, :, None]                      # [1, C=n_in, H=n_in, 1]
  want = F.interpolate(eye, size=(n_out, 1), mode=method, align_corners=False)[0, :, :, 0].T
  assert_close(resize.interp_matrix(n_in, n_out, method), want.numpy(), 1e-5)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_interp_matrix_matches_torch_1d(method, n_in, n_out):
  x = _data(0, (n_in, 1, 3))
  # Resize H only (W stays 1) so the matrix is checked on its own.
  want = _torch_resize(x, (n_out, 1), method)[:, 0]
  got = resize.interp_matrix(n_in, n_out, method) @ x[:, 0]
  assert_close(got, want, 1e-5)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("in_hw,out_hw", [((14, 14), (32, 40)), ((32, 40), (14, 14)),
                                          ((7, 9), (12, 5)), ((16, 20), (23, 31)),
                                          ((24, 24), (24, 24))])
def test_resize_2d_matches_torch(method, in_hw, out_hw):
  x = _data(1, (*in_hw, 4))
  got = np.asarray(resize.resize_2d(x, out_hw, method, axes=(0, 1)))
  assert_close(got, _torch_resize(x, out_hw, method), 1e-5)


def test_resize_2d_default_axes_batched():
  x = _data(2, (2, 6, 10, 3))
  got = np.asarray(resize.resize_2d(x, (9, 4), "bicubic"))  # [..., H, W, C]
  t = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(9, 4), mode="bicubic",
                    align_corners=False).permute(0, 2, 3, 1).numpy()
  assert_close(got, t, 1e-5)


@pytest.mark.parametrize("in_hw,out_hw", [((32, 32), (8, 8)), ((12, 18), (4, 3)),
                                          ((6, 8), (6, 4)), ((5, 7), (1, 1))])
def test_area_matches_torch_for_integer_ratios(in_hw, out_hw):
  x = _data(3, (*in_hw, 3))
  got = np.asarray(resize.resize_2d(x, out_hw, "area", axes=(0, 1)))
  assert_close(got, _torch_resize(x, out_hw, "area"), 1e-5)
  pooled = F.adaptive_avg_pool2d(torch.from_numpy(x).permute(2, 0, 1)[None], out_hw)
  assert_close(got, pooled[0].permute(1, 2, 0).numpy(), 1e-5)


def test_unknown_method_raises():
  with pytest.raises(ValueError, match="unknown resize method"):
    resize.interp_matrix(4, 8, "nearest")

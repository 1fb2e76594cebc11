"""dCTS/CTS invariants: partitions, exactness at τ = 1, padding, un-sharing, buckets, jit."""
import functools

from numerics import assert_close  # tests/numerics.py

from configs import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step_jax.models import atm
from step_jax.models import builder
from step_jax.models import segmenter
from step_jax.models import supertokens as st
from step_jax.models import vit


def _merge_levels(scores, tau, grid):
  """st.merge_levels as one compiled program (eagerly, each of its ~60 ops compiles alone)."""
  return jax.jit(lambda s: st.merge_levels(s, tau, grid))(scores)


_token_layout = jax.jit(st.token_layout)


def random_levels(seed, grid, b=3, taus=(0.6, 0.8, 0.9, 0.9)):
  rng = np.random.default_rng(seed)
  scores = {k: jnp.asarray(rng.random((b, grid[0] // k + 1, grid[1] // k + 1)) ** 0.3)
            for k in st.SIZES}
  return _merge_levels(scores, dict(zip(st.SIZES, taus)), grid)


@pytest.mark.parametrize("grid", [(32, 32), (13, 22), (17, 40), (5, 3)])
def test_partition_covers_every_cell_exactly_once(grid):
  level = np.asarray(random_levels(0, grid))
  layout = jax.tree.map(np.asarray, _token_layout(jnp.asarray(level)))
  for b in range(level.shape[0]):
    leaf = layout["leaf"][b].reshape(grid)
    count = layout["count"][b]
    assert leaf.min() == 0 and leaf.max() == count - 1
    for t in range(count):
      cells = np.argwhere(leaf == t)
      (i0, j0), (i1, j1) = cells.min(0), cells.max(0)
      k = level[b, i0, j0]
      # every token covers one aligned, complete k x k window and nothing else
      assert i1 - i0 + 1 == k and j1 - j0 + 1 == k and len(cells) == k * k
      assert i0 % k == 0 and j0 % k == 0 and np.all(level[b, i0:i1 + 1, j0:j1 + 1] == k)
      # the NumPy helpers (analysis, figures) name the same anchor for every cell
      assert np.all(st.anchor_cells(level[b])[leaf == t] == i0 * grid[1] + j0)
    assert st.anchors(level[b]).sum() == count


def test_coarse_to_fine_no_window_merged_twice():
  grid = (16, 16)
  ones = lambda k: jnp.ones((1, 16 // k, 16 // k))
  level = _merge_levels({k: ones(k) for k in st.SIZES}, {k: 0.5 for k in st.SIZES}, grid)
  assert np.all(np.asarray(level) == 16)     # the 16x16 window wins, nothing inside it merges
  lay = _token_layout(level)
  assert int(lay["count"][0]) == 1


@pytest.mark.parametrize("grid,expected", [
    ((32, 32), 4),                 # four 16x16 windows
    ((32, 40), 4 + 4),             # + a 32x8 strip: four 8x8 windows
    ((3, 5), 2 + 7),               # two 2x2 windows + the 7 cells outside them
    ((13, 22), None),              # irregular: only the greedy count below
])
def test_all_windows_forced_to_merge_count(grid, expected):
  def arithmetic(h, w, sizes=(16, 8, 4, 2)):
    cover = np.zeros((h, w), bool)
    n = 0
    for k in sizes:
      for i in range(0, (h // k) * k, k):
        for j in range(0, (w // k) * k, k):
          if not cover[i:i + k, j:j + k].any():
            cover[i:i + k, j:j + k] = True
            n += 1
    return n + (~cover).sum()
  scores = {k: jnp.ones((1, grid[0] // k, grid[1] // k)) for k in st.SIZES}
  level = _merge_levels(scores, {k: 0.0 for k in st.SIZES}, grid)
  count = int(_token_layout(level)["count"][0])
  assert count == arithmetic(*grid)
  if expected is not None:
    assert count == expected


def test_window_purity_rules():
  lab = np.zeros((1, 64, 64), np.uint8)          # 2x2 windows of 16-px patches: 32 px
  lab[0, :32, 32:] = 3                            # window (0,1): pure class 3
  lab[0, 32:, :32] = 255                          # window (1,0): all ignore → pure
  lab[0, 32:, 32:] = 1
  lab[0, 40, 40] = 255                            # window (1,1): one class + ignore → 0
  pure = np.asarray(st.window_purity(jnp.asarray(lab), 2, 16, 255))
  np.testing.assert_array_equal(pure[0], [[1, 1], [1, 0]])
  lab[0, 0, 0] = 5                                # mixed window (0,0) → 0
  border = np.asarray(st.window_purity(jnp.asarray(lab), 2, 16, 255, border_ignore=True))
  np.testing.assert_array_equal(border[0], [[0, 1], [1, 255]])   # ring: 1-class+ignore → 255


def test_cts_merges_exactly_k_windows():
  rng = np.random.default_rng(0)
  level = st.cts_levels(jnp.asarray(rng.random((2, 8, 8))), 10, (16, 16))
  lay = _token_layout(level)
  np.testing.assert_array_equal(lay["count"], [256 - 30] * 2)
  assert np.all(np.isin(np.asarray(level), [1, 2]))
  with pytest.raises(ValueError, match="exceeds"):
    st.cts_levels(jnp.zeros((1, 8, 8)), 65, (16, 16))


def test_unshare_inverts_share():
  grid = (13, 22)
  level = random_levels(1, grid)
  lay = _token_layout(level)
  # A per-cell value that is constant on each superpatch: its anchor's raster index.
  ii, jj = np.mgrid[:grid[0], :grid[1]]
  lv = np.asarray(level)
  anchor_id = ((ii - ii % lv) * grid[1] + (jj - jj % lv)).reshape(lv.shape[0], -1)
  tokens = jnp.take_along_axis(jnp.asarray(anchor_id), lay["order"], axis=1)  # share
  np.testing.assert_array_equal(st.unshare(tokens, lay["leaf"]), anchor_id)   # un-share
  # and with a leading query axis, as for mask logits [B, Q, C]
  q = jnp.stack([tokens, tokens * 2], 1)
  np.testing.assert_array_equal(st.unshare(q, lay["leaf"])[:, 1], 2 * anchor_id)


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_superpatch_pixels(k):
  x = jax.random.uniform(jax.random.key(k), (1, 16 * 16, 16 * 32, 3))
  table = st.pyramid_table(x, 16, "area")
  offsets, total = st.level_offsets((16, 32))
  assert table.shape == (1, total, 768)
  # token (level k, row 0, col 1) = area-mean of its (16k)² pixels, resized to 16x16
  sp = x[0, :16 * k, 16 * k:32 * k]
  want = sp.reshape(16, k, 16, k, 3).mean((1, 3)).reshape(-1)
  assert_close(table[0, offsets[k] + 1], want, 1e-6)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_bilinear_superpatch_matches_torch(k):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(k).random((1, 64, 96, 3)).astype(np.float32)
  ours = st.downsample(jnp.asarray(x), k, "bilinear")
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                        scale_factor=1 / k, mode="bilinear",
                                        align_corners=False).permute(0, 2, 3, 1).numpy()
  assert_close(ours, ref, 1e-6)


def test_bucket_capacities_and_index():
  caps = st.bucket_capacities(1024, (0.25, 0.5, 0.5, 0.75))
  assert caps == (256, 512, 768, 1024)
  assert int(st.bucket_index(jnp.array([100, 300]), caps)) == 1
  assert int(st.bucket_index(jnp.array([512]), caps)) == 1
  assert int(st.bucket_index(jnp.array([1024]), caps)) == 3


################################################################################
# Whole-model invariants.                                                      #
################################################################################
class ConstPolicy(nn.Module):
  """Stand-in policy: constant logits per window size, or logits from a given array."""
  value: float = 0.0

  @nn.compact
  def __call__(self, images):
    b, h, w, _ = images.shape
    bias = self.param("bias", nn.initializers.zeros, ())
    return {k: jnp.full((b, h // (16 * k), w // (16 * k)), self.value) + bias
            for k in st.SIZES}


def make_model(merge="none", **kw):
  backbone = vit.ViT(width=32, depth=3, mlp_dim=64, num_heads=2, posemb_grid=(4, 4))
  head = atm.ATMHead(num_classes=4, dim=32, num_heads=4, num_layers=1, num_stages=2)
  return segmenter.Segmenter(backbone, head, (2, 3), merge=merge, **kw)


def _init(model, images, **kw):
  """Variables from one compiled init (run eagerly, every op would compile on its own), of
  the model with one capacity: the same parameters, without a switch branch per bucket."""
  model = model.clone(buckets=(1.0,))
  return jax.jit(functools.partial(model.init, **kw))(jax.random.key(0), images)


def _images(b=2, h=128, w=96, seed=0):
  return jax.random.uniform(jax.random.key(seed), (b, h, w, 3), minval=0, maxval=255)


def test_threshold_one_gives_the_plain_vit_exactly():
  images = _images()
  plain = make_model()
  params = _init(plain, images)
  ref, _ = jax.jit(plain.apply)(params, images)
  dcts = make_model("dcts", thresholds=(1.0,) * 4, policy=ConstPolicy(50.0))  # σ(50) = 1.0
  p2 = {"params": dict(params["params"], policy={"bias": jnp.zeros(())})}
  out, info = jax.jit(dcts.apply)(p2, images)
  assert np.all(np.asarray(info["num_tokens"]) == 48) and np.all(np.asarray(info["level"]) == 1)
  assert_close(out["pred_masks"], ref["pred_masks"], 1e-5)
  assert_close(out["pred_logits"], ref["pred_logits"], 1e-5)
  assert_close(out["aux"][0]["pred_masks"], ref["aux"][0]["pred_masks"], 1e-5)


def _oracle_labels(b=2, h=128, w=96):
  lab = np.zeros((b, h, w), np.int32)
  lab[:, 64:, :] = 1                     # big pure regions merge into 2x2/4x4 windows
  lab[:, 64:80, 40:56] = 2
  lab[1, :, 80:] = 3
  return jnp.asarray(lab)


def test_padding_tokens_never_change_valid_outputs():
  images, labels = _images(), _oracle_labels()
  model = make_model("oracle", buckets=(1.0,))
  params = _init(model, images, labels=labels)
  full, info = jax.jit(lambda p: model.apply(p, images, labels=labels))(params)  # capacity 48
  n = int(np.max(info["num_tokens"]))
  assert n < 48
  tight, _ = jax.jit(lambda p: model.apply(p, images, labels=labels, capacity=n))(params)
  assert_close(tight["pred_masks"], full["pred_masks"], 1e-5)
  assert_close(tight["pred_logits"], full["pred_logits"], 1e-5)


def test_bucket_switch_jits_once_and_picks_the_smallest_bucket():
  images, labels = _images(), _oracle_labels()
  model = make_model("oracle", buckets=(0.25, 0.5, 0.75, 1.0))
  params = _init(model, images, labels=labels)
  fwd = jax.jit(lambda p, im, lab: model.apply(p, im, labels=lab))
  out, info = fwd(params, images, labels)
  caps = st.bucket_capacities(48, (0.25, 0.5, 0.75, 1.0))
  want = min(c for c in caps if c >= int(np.max(info["num_tokens"])))
  assert int(info["capacity"]) == want
  ref, _ = jax.jit(lambda p: model.apply(p, images, labels=labels, capacity=48))(params)
  assert_close(out["pred_masks"], ref["pred_masks"], 1e-5)
  # Other token counts reuse the compiled program (no retrace per image).
  fwd(params, images, jnp.zeros_like(labels))
  fwd(params, images, labels.at[:, :, :16].set(3))
  assert fwd._cache_size() == 1
  jaxpr = jax.make_jaxpr(lambda p: model.apply(p, images, labels=labels))(params)
  conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
  assert len(conds) == 1 and len(conds[0].params["branches"]) == len(caps)


@pytest.mark.slow  # the dCTS variant in the test below covers it in the default run
def test_forward_is_differentiable_wrt_vit_params():
  images, labels = _images(), _oracle_labels()
  model = make_model("oracle", buckets=(0.5, 1.0))
  params = _init(model, images, labels=labels)

  def loss(p):
    out, _ = model.apply(p, images, labels=labels)
    return jnp.sum(out["pred_masks"] ** 2) + jnp.sum(out["pred_logits"] ** 2)

  g = jax.jit(jax.grad(loss))(params)["params"]
  for name in ("embedding", "pos_embedding", "blocks_0"):
    leaves = jax.tree.leaves(g["backbone"][name])
    assert all(np.all(np.isfinite(l)) for l in leaves)
    assert any(np.any(np.asarray(l) != 0) for l in leaves)


def test_policy_frozen_and_fewer_tokens_with_lower_thresholds():
  """...and the ViT gets gradients through merged tokens padded to a bucket capacity."""
  images = _images()
  model = make_model("dcts", thresholds=(0.4, 0.9, 0.9, 0.9), policy=ConstPolicy(0.0))
  params = _init(model, images)   # σ(0) = .5: only 2x2 windows pass τ=.4

  def loss(p):   # 12 tokens padded to a capacity of 32
    out, info = model.apply(p, images, capacity=32)
    return jnp.sum(out["pred_masks"] ** 2) + jnp.sum(out["pred_logits"] ** 2), info
  g, info = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert np.all(np.asarray(info["num_tokens"]) == 48 // 4)
  assert int(info["capacity"]) == 32
  g = g["params"]
  assert float(g["policy"]["bias"]) == 0.0
  for name in ("embedding", "pos_embedding", "blocks_0"):
    leaves = jax.tree.leaves(g["backbone"][name])
    assert all(np.all(np.isfinite(l)) for l in leaves)
    assert any(np.any(np.asarray(l) != 0) for l in leaves)


def test_cts_share_scales_k_with_the_grid():
  """cts_shared in (0, 1) is a share of the 2x2 windows: K follows the image size."""
  for h, w in ((128, 96), (256, 192)):
    images = _images(1, h, w)
    windows = (h // 32) * (w // 32)
    model = make_model("cts", cts_shared=0.4, policy=ConstPolicy(0.0))
    params = _init(model, images)
    _, info = jax.jit(model.apply)(params, images)
    k = round(0.4 * windows)
    assert int(info["num_tokens"][0]) == (h // 16) * (w // 16) - 3 * k
    level = np.asarray(info["level"][0])
    assert np.sum(level == 2) == 4 * k  # K windows of 2x2 cells, the rest single patches
  cfg = common.model_config("Mu/16", 64)
  cfg.update(merge="cts", cts_shared=2.5,
             policy=common.ml_collections.ConfigDict(dict(source="pypi", hidden=8)))
  with pytest.raises(ValueError, match="cts_shared=2.5"):
    builder.build(cfg, 4, (64, 64))

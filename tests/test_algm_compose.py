"""ALGM's compositions (models/algm_encoder.py) on a tiny Mu/16 model at 64x96 (a 4x6 grid;
ALGM's merges in blocks 1 and 2, out_layers 2, 3, 4):
  method=dcts_algm: ALGM's global merge over dCTS supertokens (given level maps: no policy);
  method=algm_dtop: early exits (SegViT's head) rating ALGM's merged tokens."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import step as step_config
from numerics import assert_close
from step_jax.evaluation import tokens as tokens_lib
from step_jax.models import algm
from step_jax.models import algm_encoder
from step_jax.models import builder
from step_jax.models import flops
from step_jax.models import supertokens
from step_jax.models import variables as variables_lib

HW, GRID, N = (64, 96), (4, 6), 24


def _config(method, **model):
  config = common.ml_collections.ConfigDict(dict(num_classes=4))
  config.data = common.ml_collections.ConfigDict(dict(image_size=HW))
  config.model = common.model_config("Mu/16", 64)
  step_config.set_method(config.model, method, "Mu/16")
  config.model.update(dict(dict(buckets=(0.5, 1.0), exit_buckets=(0.5, 1.0), head_layers=1),
                           **model))
  return config


def _build(config):
  return builder.build(config.model, config.num_classes, HW)


@functools.lru_cache(maxsize=None)
def _variables():
  """ViT and head variables; every model here shares them (dcts_algm runs on given level maps,
  so its policy net is never called)."""
  return variables_lib.random_variables(_build(_config("algm")), HW)


def _images():
  """Noise but for flat regions: image 0 flat on its left 4 columns, image 1 on its top half."""
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, (2, *HW, 3)).astype(np.float32)
  images[0, :, :64] = 90.0
  images[1, :32] = 200.0
  return jnp.asarray(images)


def _levels():
  """dCTS level maps: image 0 a 4x4 superpatch (9 tokens), image 1 three 2x2 ones (15)."""
  level = np.ones((2, *GRID), np.int32)
  level[0, :, :4] = 4
  level[1, :2, :4] = 2
  level[1, 2:, :2] = 2
  return jnp.asarray(level)


def _same_outputs(a, b, rel):
  assert_close(a["pred_logits"], b["pred_logits"], rel, what="pred_logits")
  assert_close(a["pred_masks"], b["pred_masks"], rel, what="pred_masks")
  assert len(a["aux"]) == len(b["aux"])
  for i, (x, y) in enumerate(zip(a["aux"], b["aux"])):
    assert_close(x["pred_masks"], y["pred_masks"], rel, what=f"aux {i}")


def _constant_per_token(values, token):
  """values [..., gh, gw] are equal on the cells of each token of token [gh, gw]."""
  values, token = np.asarray(values), np.asarray(token)
  for t in np.unique(token):
    cells = values[..., token == t]
    np.testing.assert_array_equal(cells, np.broadcast_to(cells[..., :1], cells.shape))


@functools.lru_cache(maxsize=None)
def _dcts_algm_run():
  """(config, model, outputs, info) of dcts_algm on _levels()."""
  config = _config("dcts_algm")
  model = _build(config)
  out, info = jax.jit(functools.partial(model.apply, level=_levels()))(_variables(), _images())
  return config, model, out, info


def test_dcts_algm_without_merges_is_dcts():
  """algm_global_min above 1: nothing merges; dCTS with the same variables and level maps
  (dcts_algm's supertokens and merged tokens both in the 16-slot bucket, 7 and 1 padded
  slots; dCTS in one full capacity, which gives the bucketed outputs: test_supertokens)."""
  model = _build(_config("dcts_algm", algm_global_min=1.01))
  images, level = _images(), _levels()
  dcts = model.clone(merge="dcts", buckets=(1.0,))
  ref, _ = jax.jit(functools.partial(dcts.apply, level=level))(_variables(), images)
  out, info = jax.jit(functools.partial(model.apply, level=level))(_variables(), images)
  np.testing.assert_array_equal(info["num_tokens"], [9, 15])
  np.testing.assert_array_equal(info["algm_tokens"], [[9], [15]])
  assert int(info["capacity"]) == 16 and np.asarray(info["algm_capacity"]).tolist() == [16]
  _same_outputs(out, ref, 1e-5)


def test_dcts_algm_merges_supertokens_and_unmerges_to_their_layout():
  """The global merge merges supertokens (fewer tokens after it); every supertoken's cells
  map to one merged slot, the slots are the image's merged tokens; the deepest head stage,
  which reads only unmerged block-4 features, is constant on each merged token's cells."""
  _, _, out, info = _dcts_algm_run()
  counts = np.asarray(info["algm_tokens"])[:, 0]
  assert (counts < np.asarray(info["num_tokens"])).all()
  level = np.asarray(_levels())
  anchor = supertokens.anchor_cells(level)   # supertoken of each cell
  source = np.asarray(info["algm_source"])
  for b in range(2):
    np.testing.assert_array_equal(np.unique(source[b]), np.arange(counts[b]))
    _constant_per_token(source[b], anchor[b])
    _constant_per_token(np.asarray(out["aux"][0]["pred_masks"])[b], source[b])
  assert np.isfinite(np.asarray(out["pred_masks"])).all()


def test_dcts_algm_padded_slots_are_never_matched():
  """The global merge over supertokens in 16 slots: padded slots are assigned nowhere (-1) and
  garbage in them changes no assignment; the valid slots' plan is the plan of the image's
  supertokens alone; sizes are the patches each supertoken covers."""
  model = _build(_config("dcts_algm"))
  layout = supertokens.token_layout(_levels())

  def segment(mdl, images, layout):
    return algm_encoder.supertoken_segment(mdl, mdl.normalize(images), layout, GRID, slots=N,
                                           capacity=16, train=False)
  y, size, plan, valid, _ = jax.jit(functools.partial(model.apply, method=segment))(
      _variables(), _images(), layout)
  counts = np.asarray(layout["count"])
  assign, valid = np.asarray(plan.assign), np.asarray(valid)
  np.testing.assert_array_equal(valid, np.arange(N)[None] < counts[:, None])
  plan_of = jax.jit(algm.global_merge_plan, static_argnums=2)   # block 2's merge
  garbage = jnp.where(valid[..., None], y, 1e3 * jax.random.normal(jax.random.key(0), y.shape))
  np.testing.assert_array_equal(np.asarray(plan_of(garbage, jnp.asarray(valid), 2).assign),
                                assign)
  for b, c in enumerate(counts):
    assert (assign[b, c:] == -1).all() and (np.asarray(size)[b, c:] == 0).all()
    alone = plan_of(y[b:b + 1, :c], jnp.ones((1, c), bool), 2)
    np.testing.assert_array_equal(np.asarray(alone.assign)[0], assign[b, :c])
    assert int(alone.count[0]) == int(plan.count[b]) < c
    areas = np.asarray(size)[b, :c]
    assert areas.sum() == N and set(areas.tolist()) <= {1.0, 4.0, 16.0}


@functools.lru_cache(maxsize=None)
def _algm_dtop_forward():
  """algm_dtop with exits after blocks 2 (the global merge's block) and 3 (keep_top_k 1: at
  tau 0 all but one token per predicted class halt at each exit), jitted once for any tau.
  Exit buckets: the capacities 16 and 24 of the merged tokens' (fewer programs)."""
  config = _config("algm_dtop", exit_layers=(2, 3), keep_top_k=1, exit_buckets=(1.0,))
  model = _build(config)
  run = jax.jit(lambda v, x, tau: model.clone(exit_threshold=(tau, tau)).apply(v, x))
  return config, model, run


@functools.lru_cache(maxsize=None)
def _algm_dtop_run(tau):
  """(config, model, outputs, info) of algm_dtop at exit threshold tau."""
  config, model, run = _algm_dtop_forward()
  return (config, model) + run(_variables(), _images(), jnp.float32(tau))


def test_algm_dtop_without_halting_is_algm():
  """Exit threshold 1: nothing halts; method=algm with the same variables (its outputs and
  head aux after the exits' predictions), the same merges (algm in one full capacity, which
  gives the bucketed outputs: test_algm_model)."""
  _, model, out, info = _algm_dtop_run(1.0)
  algm_model = model.clone(exit_layers=(), buckets=(1.0,))
  ref, ref_info = jax.jit(algm_model.apply)(_variables(), _images())
  merged = np.asarray(info["algm_tokens"])
  np.testing.assert_array_equal(merged, ref_info["algm_tokens"])
  np.testing.assert_array_equal(np.asarray(info["active_tokens"]),
                                np.repeat(merged[:, 1:], 3, axis=1))
  assert (np.asarray(info["halt_stage"]) == 2).all()
  assert len(out["aux"]) == len(ref["aux"]) + 2   # the two exits' predictions first
  _same_outputs(dict(out, aux=out["aux"][2:]), ref, 1e-5)


def test_algm_dtop_halts_merged_tokens_whole():
  """Exit threshold 0: tokens halt at both exits; a merged token halts with all its cells, and
  its exit's masks are the same on them; fewer tokens run after each exit."""
  _, _, out, info = _algm_dtop_run(0.0)
  active = np.asarray(info["active_tokens"])
  assert (active[:, 1] < active[:, 0]).all() and (active[:, 2] <= active[:, 1]).all()
  halt, source = np.asarray(info["halt_stage"]), np.asarray(info["algm_source"])
  for b in range(2):
    _constant_per_token(halt[b], source[b])
    for s in range(2):
      _constant_per_token(np.asarray(out["aux"][s]["pred_masks"])[b], source[b])
    assert len(np.unique(source[b][halt[b] == 2])) == active[b, 2]
  assert np.isfinite(np.asarray(out["pred_masks"])).all()


def _block(n_attn, n_mlp, d=64, mlp=256):
  """One pre-norm block, attention on n_attn tokens and MLP on n_mlp (fvcore's convention:
  LayerNorm 5 per element, one per multiply-add)."""
  return 5 * n_attn * d + 4 * n_attn * d * d + 2 * n_attn * n_attn * d + \
      5 * n_mlp * d + 2 * n_mlp * d * mlp


def _match(n, d=64):
  return -(-n // 2) * (n // 2) * d


def test_flops_count_the_real_tokens_of_each_block():
  """image_tokens (what evaluation and the benchmark report) against a hand count of every
  block at its tokens: dcts_algm's supertokens until block 2's attention, the merged ones
  after, the head on the supertokens, the policy net; algm_dtop's ALGM blocks, the blocks
  after each exit on the active tokens, the exits' stage 0 on them, SegViT's head on the grid."""
  embed = lambda n: n * 16 * 16 * 3 * 64
  head = lambda config, n: flops.atm_head_macs([n], 4, config.model.head_dim, 64, 1, 5)
  config, model, _, info = _dcts_algm_run()
  dcts = _config("dcts")
  for j in range(2):
    n, n2 = int(info["num_tokens"][j]), int(info["algm_tokens"][j, 0])
    c, c2 = int(info["capacity"]), int(info["algm_capacity"][0])
    row = tokens_lib.image_tokens(config, model, info, j)
    assert row["tokens"] == [n, n2] and row["capacity"] == [c, c2]
    for key, (a, b) in (("useful", (n, n2)), ("executed", (c, c2))):
      backbone = embed(a) + _block(a, a) + _block(a, b) + 2 * _block(b, b) + _match(a)
      assert_close(row[key]["backbone"], backbone / 1e9, 1e-12, what=key)
      ref = flops.token_macs(dcts, a)   # the head on the supertokens, the policy net
      assert_close([row[key]["heads"], row[key]["policy"]], [ref["heads"], ref["policy"]],
                   1e-12, what=key)

  config, model, _, info = _algm_dtop_run(0.0)
  algm_cfg = _config("algm")
  for j in range(2):
    n1, n2 = (int(t) for t in info["algm_tokens"][j])
    a0, a1, a2 = (int(t) for t in info["active_tokens"][j])
    row = tokens_lib.image_tokens(config, model, info, j)
    assert a0 == n2 and row["tokens"] == [N, n1, n2, a1, a2]
    caps = row["capacity"]
    assert caps[:3] == [N] + [int(c) for c in info["algm_capacity"]]
    assert caps[2:] == [int(c) for c in info["stage_capacity"]]
    for key, (m1, m2, s1, s2) in (("useful", (n1, n2, a1, a2)), ("executed", caps[1:])):
      backbone = embed(N) + _block(N, m1) + _block(m1, m2) + _block(s1, s1) + \
          _block(s2, s2) + _match(m1)
      assert_close(row[key]["backbone"], backbone / 1e9, 1e-12, what=key)
      heads = head(config, m2) + head(config, s1) + \
          flops.token_macs(algm_cfg, N)["heads"] * 1e9   # exits' stage 0, SegViT's head
      assert_close(row[key]["heads"], heads / 1e9, 1e-12, what=key)


@pytest.mark.parametrize("method", ["dcts_algm", "algm_dtop"])
def test_train_forward_gives_finite_gradients(method):
  """train=True, jitted, as the trainer runs it (one full capacity, exits as masks; algm_dtop
  halting tokens at tau 0): finite, non-zero gradients for the ViT and the head."""
  config = _config(method, exit_threshold=0.0, keep_top_k=1)
  model = _build(config).clone(buckets=(1.0,), exit_mode="mask")
  kw = dict(level=_levels()) if method == "dcts_algm" else {}
  variables = _variables()

  def loss(params):
    out, info = model.apply(dict(variables, params=params), _images(), train=True,
                            rngs={"dropout": jax.random.key(0)}, **kw)
    preds = [out] + list(out["aux"])
    return sum(jnp.sum(p["pred_masks"] ** 2) + jnp.sum(p["pred_logits"] ** 2)
               for p in preds), info
  grads, info = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  assert (np.asarray(info["algm_tokens"])[:, -1] < N).all()   # merged
  if model.exit_layers:
    assert (np.asarray(info["halt_stage"]) == 0).any()         # halted at the exit
  for name in ("embedding", "blocks_0", "blocks_1", "blocks_3"):
    leaves = jax.tree.leaves(grads["backbone"][name])
    assert all(np.isfinite(l).all() for l in leaves), name
    assert any(np.any(np.asarray(l) != 0) for l in leaves), name
  assert all(np.isfinite(l).all() for l in jax.tree.leaves(grads["head"]))


def _model_config(method, **changes):
  model = common.ml_collections.ConfigDict(_config(method).model.to_dict(), type_safe=False)
  model.update(changes)
  return model


@pytest.mark.parametrize("method, changes, match", [
    ("dcts_algm", dict(exit_layers=(2,)), "dcts_algm' with early exits"),
    ("algm_dtop", dict(exit_layers=(1, 3)), r"at or after the global merge's block 2.*\(1, 3\)"),
    ("algm_dtop", dict(exit_head="dtop"), "exit_head='segvit'.*'dtop'"),
    ("dcts_algm", dict(algm_layers=(2, 2)), r"algm_layers=\(2, 2\)"),
])
def test_bad_composition_config_is_a_clear_error(method, changes, match):
  with pytest.raises(ValueError, match=match):
    builder.build(_model_config(method, **changes), 4, HW)


@pytest.mark.parametrize("method, merge, exits", [("dcts_algm", "dcts_algm", ()),
                                                  ("algm_dtop", "algm", (6, 8))])
def test_camvid_config_builds_the_compositions(method, merge, exits):
  from configs import camvid
  config = camvid.get_config(f"method={method},size=cpu,variant=Ti/16")
  model = builder.build(config.model, config.num_classes, config.data.image_size)
  assert (model.merge, tuple(model.exit_layers), tuple(model.algm_layers)) == (merge, exits,
                                                                               (1, 5))
  assert model.exit_head == "segvit" and (model.policy is not None) == (method == "dcts_algm")

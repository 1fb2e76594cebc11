"""orbax checkpoints: other mesh sizes, keep-N, input-iterator state, no NaN saves, init_from."""
import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import segvit
from step_jax.runtime import checkpoint as ckpt_lib
from step_jax.models import convert
from step_jax.training import optim
from step_jax.runtime import sharding
from step_jax.training import train
from step_jax.models import pretrained
from step_jax.models import variables as variables_lib

_CACHE = os.path.join(tempfile.gettempdir(), "step_jax_test_jit_cache")
if not jax.config.jax_compilation_cache_dir:
  jax.config.update("jax_compilation_cache_dir", _CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _tiny():
  cfg = segvit.get_config("variant=Mu/16,dataset=synthetic,smoke")
  cfg.data.update(image_size=(32, 32), num_train=16)
  cfg.model.update(out_layers=(2,), head_layers=1, posemb_grid=(2, 2))
  cfg.sharding.fsdp_min_size = 1024
  return cfg


def _state(cfg, mesh, seed=0):
  model, tx = variables_lib.create_model(cfg), optim.make_optimizer(cfg.optim)
  abstract, sh = train.abstract_train_state(cfg, model, mesh, tx)
  init = functools.partial(train.init_state, model=model, tx=tx, config=cfg)
  return jax.jit(init, out_shardings=sh)(jax.random.key(seed)), abstract, sh


def _assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0],
                          jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("fsdp", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_restore_onto_a_different_mesh(tmp_path, fsdp):
  cfg = _tiny()
  cfg.sharding.fsdp = fsdp
  mesh4 = sharding.make_mesh(cfg)
  state, _, sh4 = _state(cfg, mesh4)
  if fsdp:
    assert any(s.spec != P() for s in jax.tree.leaves(sh4["params"]))
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  ck.save(3, state)
  ck.close()
  # 4 devices → 1 device (a smaller machine, or evaluation on one GPU) ...
  cfg1 = _tiny()
  cfg1.sharding.num_devices = 1
  mesh1 = sharding.make_mesh(cfg1)
  _, abstract, sh1 = _state(cfg1, mesh1, seed=1)
  restored, _, step = ckpt_lib.Checkpointer(str(tmp_path)).restore(
      sharding.with_shardings(abstract, sh1))
  assert step == 3
  leaf = restored["params"]["backbone"]["embedding"]["kernel"]
  assert leaf.sharding.mesh.size == 1 and leaf.sharding.spec == P()
  _assert_trees_equal(state, restored)
  # ... and back onto 4 devices with FSDP.
  cfg4 = _tiny()
  cfg4.sharding.fsdp = True
  _, abstract, sh = _state(cfg4, sharding.make_mesh(cfg4), seed=2)
  again, _, _ = ckpt_lib.Checkpointer(str(tmp_path)).restore(sharding.with_shardings(abstract,
                                                                                    sh))
  assert again["params"]["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec != P()
  _assert_trees_equal(state, again)


def test_keep_n_and_latest(tmp_path):
  cfg = _tiny()
  state, _, _ = _state(cfg, sharding.make_mesh(cfg))
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3, 4):
    ck.save(step, state)
  ck.wait()
  assert ck.all_steps() == [3, 4] and ck.latest_step() == 4
  ck.close()


def test_input_iterator_resumes_on_the_same_batch(tmp_path):
  cfg = _tiny()
  state, abstract, sh = _state(cfg, sharding.make_mesh(cfg))
  it = train.make_train_iter(cfg, sharding.make_mesh(cfg))
  for _ in range(3):
    next(it)
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  ck.save(3, state, it, cfg.to_dict())
  ck.close()
  want = [next(it) for _ in range(2)]
  fresh = train.make_train_iter(cfg, sharding.make_mesh(cfg))
  _, fresh, _ = ckpt_lib.Checkpointer(str(tmp_path)).restore(
      sharding.with_shardings(abstract, sh), fresh)
  got = [next(fresh) for _ in range(2)]
  for w, g in zip(want, got):
    np.testing.assert_array_equal(w["image"], g["image"])
    np.testing.assert_array_equal(w["label"], g["label"])
  assert os.path.exists(tmp_path / "checkpoints" / "3" / "config")


def test_non_finite_params_are_never_saved(tmp_path):
  cfg = _tiny()
  state, _, _ = _state(cfg, sharding.make_mesh(cfg))
  kernel = state["params"]["backbone"]["embedding"]["kernel"]
  state["params"]["backbone"]["embedding"]["kernel"] = kernel.at[0, 0].set(np.nan)
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  assert ck.save(5, state) is False
  ck.close()
  assert ck.latest_step() is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_value_in_any_leaf(bad):
  tree = dict(a=np.zeros((3, 2), np.float32), b=[np.ones(5, np.float16), np.arange(4)],
              h=np.full(2, 65504, np.float16), s=np.full(2, 6e-8, np.float16),  # max, subnormal
              g=np.ones(3, jnp.bfloat16), c=np.ones((), np.float32))
  assert bool(ckpt_lib.all_finite(tree)) and bool(ckpt_lib.all_finite({}))
  for path in (("a",), ("b", 0), ("h",), ("g",), ("c",)):
    t = jax.tree.map(np.copy, tree)
    leaf = t[path[0]] if len(path) == 1 else t[path[0]][path[1]]
    leaf.reshape(-1)[-1] = bad
    assert not bool(ckpt_lib.all_finite(t)), path
  big = np.iinfo(np.int64).max
  assert bool(ckpt_lib.all_finite(dict(tree, i=np.full(3, big))))  # integers are not checked


def test_init_from_workdir_npz_and_timm(tmp_path):
  cfg = _tiny()
  mesh = sharding.make_mesh(cfg)
  donor, _, _ = _state(cfg, mesh, seed=7)
  target, _, _ = _state(cfg, mesh, seed=8)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "base"))
  ck.save(10, donor)
  ck.close()
  # A whole step_jax workdir (e.g. the BASE model before pruning fine-tuning).
  loaded = pretrained.load_pretrained(str(tmp_path / "base"), cfg.model)
  merged, info = pretrained.merge_params(target["params"], loaded)
  _assert_trees_equal(donor["params"], merged)
  assert not info["missing"]
  # A timm-named ViT state dict (as convert writes it): the backbone only.
  backbone = jax.device_get(donor["params"]["backbone"])
  sd = convert.params_to_timm_vit(backbone)
  sd["pos_embed"] = np.concatenate([np.zeros((1, 1, sd["pos_embed"].shape[-1]), np.float32),
                                    sd["pos_embed"]], axis=1)   # timm: with a cls position
  sd["cls_token"] = np.zeros((1, 1, sd["pos_embed"].shape[-1]), np.float32)
  np.savez(tmp_path / "vit.npz", **sd)
  loaded = pretrained.load_pretrained(str(tmp_path / "vit.npz"), cfg.model)
  merged, info = pretrained.merge_params(target["params"], loaded)
  _assert_trees_equal(donor["params"]["backbone"], merged["backbone"])
  _assert_trees_equal(target["params"]["head"], merged["head"])
  assert info["missing"] and all(m.startswith("head/") for m in info["missing"])
  # Mismatched shapes are an error that names the parameter.
  bad = {"backbone": {"pos_embedding": np.zeros((3, 3, 64), np.float32)}}
  with pytest.raises(ValueError, match="backbone/pos_embedding"):
    pretrained.merge_params(target["params"], bad)

"""STEP from a trained SegViT (`config.init_from`): every head stage lands on the stage that
reads the same block, whatever the exit design; the default design with nothing halting is
the trained SegViT itself."""
import jax
import numpy as np
import pytest

from numerics import assert_close  # tests/numerics.py

from step_jax.models import pretrained
from step_jax.models import builder
from step_jax.models import variables as variables_lib
from step_jax.training import train
import test_train_step as train_step_tests  # pylint: disable=g-bad-import-order


def _tiny(method, **model):
  cfg = train_step_tests._tiny(method, **model)   # Mu/16 at 64², one decoder layer
  cfg.optim.total_steps = 2
  return cfg


@pytest.fixture(scope="module")
def segvit_workdir(tmp_path_factory):
  """A real `method=segvit` training run (2 steps): Mu/16, out_layers (2, 3, 4)."""
  workdir = str(tmp_path_factory.mktemp("segvit"))
  train.train_and_evaluate(_tiny("segvit"), workdir)
  return workdir


def _loaded(cfg, workdir):
  """(model, params after init_from, the SegViT's params) for config `cfg`."""
  cfg.init_from = workdir
  model = variables_lib.create_model(cfg)
  init = variables_lib.random_variables(model, cfg.data.image_size)["params"]  # no compile
  state = dict(params=jax.tree.map(jax.numpy.asarray, init), model_state={})
  params = train._load_init_from(state, cfg)["params"]   # pylint: disable=protected-access
  source = variables_lib.load(None, workdir)["params"]
  return model, jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, source)


def _stage(params, module, i):
  return params[module][f"input_proj_{i}"]["kernel"], params[module][f"decoder_{i}_0"]


def test_segvit_design_loads_segvit_as_is_and_is_segvit_at_tau_one(segvit_workdir):
  cfg = _tiny("dtop", exit_layers=(1, 2), exit_head="segvit", exit_threshold=1.0)
  model, params, source = _loaded(cfg, segvit_workdir)
  flat, want = pretrained.flatten(params), pretrained.flatten(source)
  assert set(flat) == set(want)                            # the same parameter layout
  for k in want:
    np.testing.assert_array_equal(flat[k], want[k], err_msg=k)
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype(np.float32)
  out, _ = jax.jit(model.apply)({"params": params}, images)
  ref, _ = jax.jit(model.clone(exit_layers=()).apply)({"params": source}, images)
  for key in ("pred_masks", "pred_logits"):
    assert_close(out[key], ref[key], 1e-5, what=key)


def test_other_designs_get_each_stage_from_the_stage_trained_on_its_block(segvit_workdir):
  # SegViT (Mu/16): stage 0 reads block 4, stage 1 block 3, stage 2 block 2.
  _, source = _loaded(_tiny("segvit"), segvit_workdir)[1:]
  # Shallow first: its stage i reads out_layers[i] = 2, 3, 4 (exit 2 is among them).
  model, params, _ = _loaded(_tiny("dtop", exit_layers=(2,), exit_head="atm_shallow_first"),
                             segvit_workdir)
  assert builder.head_stages(_tiny("dtop", exit_layers=(2,),
                                     exit_head="atm_shallow_first").model) == [
      ("head", 0, 2), ("head", 1, 3), ("head", 2, 4)]
  for i, j in ((0, 2), (1, 1), (2, 0)):
    got, want = _stage(params, "head", i), _stage(source, "head", j)
    np.testing.assert_array_equal(got[0], want[0])
    jax.tree.map(np.testing.assert_array_equal, got[1], want[1])
  # DToP's heads with (C+1)-way classes: the final head reads block 4 (SegViT's stage 0), the
  # exit head at block 2 SegViT's stage 2; class queries and classifier from SegViT's head.
  _, params, _ = _loaded(_tiny("dtop", exit_layers=(2,), exit_head="dtop_multiclass"),
                         segvit_workdir)
  np.testing.assert_array_equal(_stage(params, "head", 0)[0], _stage(source, "head", 0)[0])
  np.testing.assert_array_equal(_stage(params, "exit_heads_0", 0)[0],
                                _stage(source, "head", 2)[0])
  np.testing.assert_array_equal(params["head"]["queries"], source["head"]["queries"])
  # DToP's binary class head cannot take SegViT's (C+1)-way classifier: refused, named.
  with pytest.raises(ValueError, match="head/class_embed/kernel"):
    _loaded(_tiny("dtop", exit_layers=(2,), exit_head="dtop"), segvit_workdir)


def test_align_refuses_when_no_stage_reads_a_common_block():
  loaded = {"head": {"input_proj_0": {"kernel": np.zeros((2, 2))}}}
  with pytest.raises(ValueError, match="none of its head stages"):
    pretrained.align_head_stages(loaded, [("head", 0, 12)], [("head", 0, 6)], source="x")


def test_config_json_of_older_runs_reads_as_trained(tmp_path):
  import json   # pylint: disable=g-import-not-at-top
  from step_jax.runtime import checkpoint   # pylint: disable=g-import-not-at-top
  for saved, want in (({"exit_layers": [8], "exit_head": "atm"}, "atm_shallow_first"),
                      ({"exit_layers": [8]}, "dtop"),
                      ({"exit_layers": [8], "exit_head": "segvit"}, "segvit"),
                      ({"exit_layers": []}, None)):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": saved}))
    assert checkpoint.read_config(str(tmp_path)).model.get("exit_head") == want, saved


def test_finetune_recipe_is_the_pruning_phase_alone():
  from configs import camvid   # pylint: disable=g-import-not-at-top
  base = camvid.get_config("method=step,size=cpu,variant=Ti/16,recipe=dtop")
  cfg = camvid.get_config("method=step,size=cpu,variant=Ti/16,init_from=/wd/segvit")
  assert cfg.init_from == "/wd/segvit" and cfg.prune_from_step == 0
  ((first, opt),) = train.optimizer_phases(cfg)      # one phase: no BASE steps
  _, (_, tune) = train.optimizer_phases(base)         # the recipe's pruning phase
  assert first == 0 and opt.to_dict() == tune.to_dict()
  assert (opt.total_steps, opt.lr, opt.warmup_steps) == (500, 1e-4, 50)
  assert train.phase_model(variables_lib.create_model(cfg), 0, cfg.prune_from_step
                           ).exit_thresholds() == (0.8, 0.8)   # pruning from step 0
  with pytest.raises(ValueError, match="init_from='/wd/segvit' fine-tunes a model with exits"):
    camvid.get_config("method=segvit,size=cpu,init_from=/wd/segvit")
  with pytest.raises(ValueError, match="init_from and recipe='dtop'"):
    camvid.get_config("method=step,size=cpu,recipe=dtop,init_from=/wd/segvit")


def test_camvid_recipes_from_scratch():
  """cpu: one schedule, pruning on for its last eighth; gpu: DToP's fresh optimizer. The
  'segvit' exits' losses weigh 0 until pruning starts, DToP's heads' 1."""
  from configs import camvid   # pylint: disable=g-import-not-at-top
  cpu = camvid.get_config("method=step,size=cpu,variant=Ti/16")
  assert (cpu.prune_from_step, cpu.prune_optim, cpu.loss.base_exit_weight) == (1750, None, 0.0)
  assert len(train.optimizer_phases(cpu)) == 1
  gpu = camvid.get_config("method=step,size=gpu")
  assert len(train.optimizer_phases(gpu)) == 2 and gpu.loss.base_exit_weight == 0.0
  dtop = camvid.get_config("method=step,size=cpu,variant=Ti/16,exit_head=dtop,recipe=dtop")
  assert dtop.loss.base_exit_weight == 1.0 and len(train.optimizer_phases(dtop)) == 2
  assert camvid.get_config("method=segvit,size=cpu").loss.base_exit_weight == 1.0
  with pytest.raises(ValueError, match="recipe='fast': use dtop or one_schedule"):
    camvid.get_config("method=step,size=cpu,recipe=fast")

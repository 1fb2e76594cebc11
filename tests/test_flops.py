"""Analytic FLOP counts against the papers' figures and against XLA's own count."""
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from numerics import assert_close  # tests/numerics.py

from step_jax.models import flops
from step_jax.models import builder
from step_jax.models import segmenter
from step_jax.models import variables as variables_lib
from step_jax.models import vit as vit_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant, image_size, num_classes, out_layers, head_dim, head_heads=12):
  return ml_collections.ConfigDict(dict(
      num_classes=num_classes,
      data=dict(image_size=tuple(image_size)),
      model=dict(variant=variant, out_layers=tuple(out_layers), head_dim=head_dim,
                 head_heads=head_heads, head_layers=3)))


SEGVIT_B512_ADE = _config("B/16", (512, 512), 150, (6, 8, 12), 384)
SEGVIT_L1024_CITYSCAPES = _config("L/16", (1024, 1024), 19, (8, 16, 24), 512, 16)


@pytest.mark.parametrize("cfg,paper", [(SEGVIT_B512_ADE, 113.0),
                                       (SEGVIT_L1024_CITYSCAPES, 2086.0)])
def test_segvit_matches_step_paper(cfg, paper):
  """STEP paper, Tables 4 and 6: SegViT baselines (fvcore GMACs)."""
  m = flops.model_macs(cfg)
  assert m["total"] == pytest.approx(m["backbone"] + m["heads"])
  assert_close(m["total"], paper, 0.05, what=str(m))
  # We land ~0.3-1.6 % above the paper everywhere (114.8 vs 113, 2093.0 vs 2086).
  assert m["total"] >= paper


@pytest.mark.parametrize("variant,res,classes,out_layers,dim,paper", [
    ("B/16", 512, 19, (6, 8, 12), 384, 110.0),        # Table 4, Cityscapes 512
    ("B/16", 768, 19, (6, 8, 12), 384, 301.0),        # Table 5
    ("B/16", 1024, 19, (6, 8, 12), 384, 670.0),       # Table 5
    ("L/16", 768, 19, (8, 16, 24), 512, 970.0),       # Table 6
    ("L/16", 512, 171, (8, 16, 24), 512, 373.0),      # Table 3, COCO-Stuff-10k
    ("L/16", 640, 150, (8, 16, 24), 512, 624.0),      # Table 3 "ADE 512" (fits 640²)
])
def test_other_step_paper_baselines(variant, res, classes, out_layers, dim, paper):
  m = flops.model_macs(_config(variant, (res, res), classes, out_layers, dim))
  assert 0.0 <= m["total"] / paper - 1 < 0.02, (m, paper)


@pytest.mark.parametrize("variant,res,classes,out_layers,dim,readme", [
    ("B/16", 512, 150, (6, 8, 12), 384, 120.9),    # ADE
    ("L/16", 640, 150, (8, 16, 24), 512, 637.9),   # ADE
    ("L/16", 512, 171, (8, 16, 24), 512, 383.9),   # COCO-Stuff-10k
])
def test_segvit_readme_counts_the_semantic_einsum(variant, res, classes, out_layers, dim,
                                                   readme):
  """SegViT's README figures include the Q·C·H·W einsum of `semantic_inference`."""
  m = flops.model_macs(_config(variant, (res, res), classes, out_layers, dim),
                       include_semantic=True)
  assert_close(m["total"], readme, 0.01, what=str(m))


@pytest.mark.parametrize("variant,res,anchor", [("B/16", 512, 106.9), ("L/16", 1024, 2064.8)])
def test_backbone_matches_reference_anchor(variant, res, anchor):
  """Reference §4 anchors: patch embedding + depth·(12·N·D² + 2·N²·D); we add the norms."""
  v = vit_lib.decode_variant(variant)
  n, d = (res // 16) ** 2, v["width"]
  block = flops.vit_block_macs(n, d, v["mlp_dim"]) - 2 * flops.layer_norm_macs(n, d)
  assert block == 12 * n * d * d + 2 * n * n * d  # mlp_dim = 4·D
  plain = (flops.patch_embed_macs(n, d, 16) + v["depth"] * block) / 1e9
  assert round(plain, 1) == anchor   # the anchors are quoted to one decimal
  backbone = flops.model_macs(_config(variant, (res, res), 19, (v["depth"],), 64))["backbone"]
  norms = v["depth"] * 2 * flops.layer_norm_macs(n, d) / 1e9
  assert backbone == pytest.approx(plain + norms, rel=1e-9)
  assert 0 < backbone / anchor - 1 < 0.002  # norms add < 0.2 %


def test_block_terms_and_key_count():
  n, d, mlp = 10, 8, 32
  expected = 3 * n * d * d + n * d * d + 2 * n * d * mlp + 2 * n * n * d + 2 * 5 * n * d
  assert flops.vit_block_macs(n, d, mlp) == expected
  # Padded bucket of capacity 16, 10 valid tokens: queries and keys both pay for capacity.
  assert flops.vit_block_macs(16, d, mlp, n_keys=16) == flops.vit_block_macs(16, d, mlp)
  assert (flops.vit_block_macs(n, d, mlp, n_keys=16) - flops.vit_block_macs(n, d, mlp)
          == 2 * n * 6 * d)
  # Fractional (averaged) token counts are fine.
  assert flops.vit_block_macs(10.5, d, mlp) > flops.vit_block_macs(10, d, mlp)


def test_atm_head_decomposes_per_stage():
  kw = dict(num_queries=7, dim=16, in_width=32, num_layers=2, num_classes_out=8)
  one = lambda n: flops.atm_head_macs([n], **kw)
  # Stages are independent given the token count of each (early exit: fewer per stage).
  assert flops.atm_head_macs([50, 30, 20], **kw) == pytest.approx(one(50) + one(30) + one(20))
  up = flops.atm_head_macs([50], **kw, upsample_hw=(4, 6)) - one(50)
  assert up == 4 * 7 * 4 * 6
  with pytest.raises(ValueError, match="in_width"):
    flops.atm_head_macs([50, 30], 7, 16, [32], 2, 8)


def test_missing_config_key_is_named():
  cfg = _config("B/16", (512, 512), 150, (6, 8, 12), 384)
  del cfg.model["head_dim"]
  with pytest.raises(KeyError, match="model.head_dim"):
    flops.model_macs(cfg)
  cfg = _config("B/16", (512, 512), 150, (6, 8, 12), 384)
  del cfg["data"]
  with pytest.raises(KeyError, match="data.image_size"):
    flops.model_macs(cfg)


def _gelu_xla_flops_per_element():
  """XLA's count for one exact GELU (erf is a polynomial: 64 flops on CPU, jax 0.10)."""
  n = 4096
  return flops.xla_flops(lambda x: nn.gelu(x, approximate=False),
                         jax.ShapeDtypeStruct((n,), jnp.float32)) / n


# Ti/16 at 224²: N = 196, D = 192. Matmuls dominate; the one elementwise op XLA charges a lot
# for is the exact GELU (erf polynomial, 32 "MACs" per element), ≈ 4.6 % of a Ti block.
TINY = dict(variant="Ti/16", hw=(224, 224), classes=5, out_layers=(4, 8, 12), head_dim=96,
            head_heads=3)


def _tiny_model():
  cfg = ml_collections.ConfigDict(dict(variant=TINY["variant"], out_layers=TINY["out_layers"],
                                       head_dim=TINY["head_dim"], head_heads=TINY["head_heads"],
                                       head_layers=3))
  model = builder.build(cfg, TINY["classes"], TINY["hw"])
  images = jax.ShapeDtypeStruct((1, *TINY["hw"], 3), jnp.float32)
  return model, images


def test_backbone_against_xla():
  model, images = _tiny_model()
  backbone = model.backbone
  params = jax.eval_shape(backbone.init, jax.random.PRNGKey(0), images)
  xla_macs = flops.xla_flops(lambda p, x: backbone.apply(p, x)[0], params, images) / 2
  v = vit_lib.decode_variant(TINY["variant"])
  n = (TINY["hw"][0] // 16) * (TINY["hw"][1] // 16)
  ours = (flops.patch_embed_macs(n, v["width"], 16)
          + v["depth"] * flops.vit_block_macs(n, v["width"], v["mlp_dim"]))
  gelu = v["depth"] * n * v["mlp_dim"] * _gelu_xla_flops_per_element() / 2
  print(f"backbone Ti/16@224: ours {ours / 1e9:.4f} GMACs, XLA/2 {xla_macs / 1e9:.4f}, "
        f"ratio {xla_macs / ours:.4f}, without GELU {(xla_macs - gelu) / ours:.4f}")
  assert 1.0 <= xla_macs / ours < 1.06
  # What is left (softmax, biases, residuals, scaling) is < 1 %.
  assert_close(xla_macs - gelu, ours, 0.01)


def test_segmenter_against_xla():
  model, images = _tiny_model()
  hw, c = TINY["hw"], TINY["classes"]
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)

  def forward(p, x):
    outputs, _ = model.apply(p, x)
    return segmenter.predict_scores(outputs, hw)

  xla_macs = flops.xla_flops(forward, params, images) / 2
  m = flops.segvit_macs(TINY["variant"], hw, c, TINY["out_layers"], TINY["head_dim"])
  ours = m["total"]
  # Gap, term by term: exact GELU (XLA counts the erf polynomial); our bilinear upsampling is
  # two interpolation matmuls, Q·H·h·w + Q·H·W·w MACs instead of fvcore's 4·Q·H·W; the semantic
  # einsum Q·C·H·W (not in the paper's count).
  v = vit_lib.decode_variant(TINY["variant"])
  gh, gw = hw[0] // 16, hw[1] // 16
  n = gh * gw
  gelu = v["depth"] * n * v["mlp_dim"] * _gelu_xla_flops_per_element() / 2
  resize = c * hw[0] * gh * gw + c * hw[0] * hw[1] * gw - 4 * c * hw[0] * hw[1]
  semantic = flops.semantic_inference_macs(c, c, *hw)
  explained = ours + gelu + resize + semantic
  print(f"segmenter Ti/16@224: ours {ours / 1e9:.4f} GMACs, XLA/2 {xla_macs / 1e9:.4f}, "
        f"ratio {xla_macs / ours:.4f}, after explained terms {xla_macs / explained:.4f}")
  assert 1.0 <= xla_macs / ours < 1.10
  assert_close(xla_macs, explained, 0.01)


def test_cli_prints_one_json_line(tmp_path):
  cfg_file = tmp_path / "segvit_test.py"
  cfg_file.write_text(textwrap.dedent("""
      import ml_collections

      def get_config(arg):
        res = int(arg)
        return ml_collections.ConfigDict(dict(
            num_classes=150, data=dict(image_size=(res, res)),
            model=dict(variant="B/16", out_layers=(6, 8, 12), head_dim=384, head_heads=12,
                       head_layers=3)))
  """))
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  arg = f"{cfg_file}:512"
  out = subprocess.run([sys.executable, "-m", "step_jax.cli.flops", f"--config={arg}"],
                       cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
  lines = out.strip().splitlines()
  assert len(lines) == 1, out
  rec = json.loads(lines[0])
  assert set(rec) == {"gflops", "backbone", "heads", "tokens", "image_size", "config"}
  assert rec["tokens"] == 1024 and rec["image_size"] == [512, 512] and rec["config"] == arg
  # (the CLI rounds to 4 decimals: <= 5e-5 off ~115 GMACs)
  assert_close(rec["gflops"], flops.model_macs(SEGVIT_B512_ADE)["total"], 1e-6)


# ----------------------------------------------------------------------------- dynamic tokens
def test_flops_reads_the_exit_head_the_builder_builds():
  """A config without model.exit_head is counted as the builder builds it (the default)."""
  from configs import step as step_configs
  cfg = step_configs.get_config("method=step,variant=B/16,dataset=ade20k,res=512,exits=6-8")
  bare = step_configs.get_config("method=step,variant=B/16,dataset=ade20k,res=512,exits=6-8")
  del bare.model["exit_head"]
  model = variables_lib.create_model(bare)
  assert model.exit_head == segmenter.DEFAULT_EXIT_HEAD
  assert flops.token_macs(bare, 1024, [1024, 700, 500]) == flops.token_macs(
      cfg, 1024, [1024, 700, 500])


def test_token_macs_full_grid_equals_segvit_count():
  from configs import step as step_configs
  cfg = step_configs.get_config("method=segvit,variant=B/16,dataset=ade20k,res=512")
  assert_close(flops.token_macs(cfg, 1024)["total"], flops.model_macs(cfg)["total"], 1e-12)


def test_token_macs_stage_arithmetic_and_policy():
  from configs import step as step_configs
  cfg = step_configs.get_config("method=step,variant=B/16,dataset=ade20k,res=512,exits=6-8,"
                                "exit_head=dtop")   # DToP's binary heads, one per stage
  full = flops.token_macs(cfg, 1024, [1024, 1024, 1024])
  pruned = flops.token_macs(cfg, 1024, [1024, 600, 400])
  b = lambda n: flops.vit_block_macs(n, 768, 3072)
  h = lambda n: flops.atm_head_macs([n], 150, 384, 768, 3, 2)
  want = 2 * (b(1024) - b(600)) + 4 * (b(1024) - b(400)) + (h(1024) - h(600)) + (h(1024) - h(400))
  assert_close((full["total"] - pruned["total"]) * 1e9, want, 1e-9)
  assert full["policy"] == pytest.approx(flops.policy_macs(512, 512) / 1e9)
  with pytest.raises(ValueError, match="stage_tokens"):
    flops.token_macs(cfg, 1024, [1024])


def test_policy_backbone_macs_match_xla():
  from step_jax.models import efficientnet
  model = efficientnet.EfficientNetLite0(out_indices=(4,))
  x = jax.ShapeDtypeStruct((1, 224, 320, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  xla = flops.xla_flops(lambda v, im: model.apply(v, im)[0], variables, x) / 2
  ours = flops.efficientnet_lite0_macs(224, 320)
  # XLA also counts ReLU6 clamps and BN arithmetic per element: ours <= XLA/2, within 10 %.
  assert 0.90 < ours / xla <= 1.0, (ours, xla)


def test_token_macs_of_segvit_exits():
  """exit_head=segvit (the default): SegViT plus its stage 0 once per exit on the tokens
  active there; halting saves the blocks after the exit, and nothing in SegViT's head (it
  reads every token)."""
  from configs import step as step_configs
  segvit = step_configs.get_config("method=segvit,variant=B/16,dataset=ade20k,res=512")
  cfg = step_configs.get_config("method=dtop,variant=B/16,dataset=ade20k,res=512,exits=6-8")
  assert builder.exit_head_of(cfg.model) == "segvit"
  h = lambda n: flops.atm_head_macs([n], 150, 384, 768, 3, 151)   # one stage
  b = lambda n: flops.vit_block_macs(n, 768, 3072)
  full = flops.model_macs(segvit)["total"] * 1e9
  assert_close(flops.token_macs(cfg, 1024, [1024] * 3)["total"] * 1e9, full + 2 * h(1024),
               1e-12)
  pruned = flops.token_macs(cfg, 1024, [1024, 700, 500])["total"] * 1e9
  assert_close(pruned, full + h(1024) + h(700) - 2 * (b(1024) - b(700))
               - 4 * (b(1024) - b(500)), 1e-12)


def test_token_macs_of_shallow_first_exits():
  """exit_head=atm_shallow_first: with nothing halted the exit model costs exactly SegViT
  (its stages are the exits); halting saves blocks and the head stages after the exit."""
  from configs import step as step_configs
  segvit = step_configs.get_config("method=segvit,variant=B/16,dataset=ade20k,res=512")
  cfg = step_configs.get_config("method=dtop,variant=B/16,dataset=ade20k,res=512,exits=8,"
                                "exit_head=atm_shallow_first")
  assert flops.token_macs(cfg, 1024, [1024, 1024])["total"] == pytest.approx(
      flops.model_macs(segvit)["total"], rel=1e-12)
  pruned = flops.token_macs(cfg, 1024, [1024, 500])
  b = lambda n: flops.vit_block_macs(n, 768, 3072)
  h = lambda n: flops.atm_head_macs([n], 150, 384, 768, 3, 151)   # the layer-12 stage
  saved = flops.model_macs(segvit)["total"] - pruned["total"]
  assert_close(saved * 1e9, 4 * (b(1024) - b(500)) + h(1024) - h(500), 1e-9)

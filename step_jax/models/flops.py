"""FLOP counting: analytic (fvcore convention) and XLA's own count.

Convention (docs/design.md §4): papers in this line of work report
fvcore `FlopCountAnalysis` numbers, where **one multiply-add counts as one FLOP** (so their
"GFLOPs" are GMACs). fvcore counts these ops and nothing else:

* matmul / linear / einsum / bmm / conv: one per multiply-add; biases are not counted;
* `layer_norm` (and group/instance norm): `numel * 5` with an affine transform (`* 4` without),
  fvcore's own "rough estimate" (`norm_flop_counter`), which we copy so totals match;
* `upsample_bilinear2d`: 4 per output element.

Elementwise ops (residual adds, GELU/ReLU, scaling, sigmoid), softmax, reductions and
`upsample_bicubic2d` (position-embedding resampling) are not counted. Neither is torch's
`scaled_dot_product_attention`, which newer torch `nn.MultiheadAttention(need_weights=False)`
dispatches to; we count the attention matmuls anyway (2·Q²·d in the ATM self-attention, well
under 1% of any model here) because they are real work.

Every function is parameterised by token counts (floats are fine: averages over a validation
set), so that supertokens (fewer tokens, variable per image) and early exit (fewer tokens from
one stage to the next) reuse them: sum `vit_block_macs` over blocks with each block's count.
ALGM merges between a block's attention and its MLP: `encoder_macs` counts each block's halves
at their own token counts (merges and exits).

`xla_flops` gives XLA's count of a jitted function for cross-checks. XLA counts 2 FLOPs per
multiply-add and also counts elementwise ops, so `xla_flops / 2` sits slightly above our
analytic MACs (see tests/test_flops.py for the measured gaps).

CLI: `python -m step_jax.cli.flops --config=configs/segvit.py:variant=B/16,dataset=ade20k,res=512`
prints one JSON line {gflops, backbone, heads, tokens, image_size, config}. For configs whose
token count depends on the image (CTS/dCTS, early exit) it runs the model on `--num_images`
real images (`--images=DIR` or the eval split) and prints the averages, the policy net
counted, with the executed GFLOPs (padding and bucket capacity included) beside them.
"""
import math
from typing import Dict, Optional, Sequence, Union

import jax

from step_jax.models import efficientnet
from step_jax.models import vit as vit_lib
from step_jax.models import builder
from step_jax.models.segmenter import ENCODER_MERGES, HEAD_LAYERS, POLICY_MERGES
from step_jax.models.segmenter import encoder_merge_layers

Number = Union[int, float]

# fvcore `norm_flop_counter`: numel * (5 if affine else 4). All our LayerNorms are affine.
LAYER_NORM_MACS_PER_ELEMENT = 5
# fvcore `elementwise_flop_counter(0, 4)` for `upsample_bilinear2d`.
BILINEAR_MACS_PER_OUTPUT = 4


def layer_norm_macs(n_tokens: Number, dim: int) -> float:
  """Affine LayerNorm over [n_tokens, dim], as fvcore counts it (5 per element)."""
  return float(LAYER_NORM_MACS_PER_ELEMENT * n_tokens * dim)


def patch_embed_macs(n_tokens: Number, width: int, patch_size: int, in_ch: int = 3) -> float:
  """Linear embedding of `n_tokens` p×p×in_ch patches (= the stride-p conv of timm/mmseg).

  Supertokens are superpatches resized to p×p and embedded with the same weights, so the
  count per token is the same; the resize itself is not counted (fvcore would not either).
  """
  return float(n_tokens * patch_size * patch_size * in_ch * width)


def vit_block_macs(n_tokens: Number, width: int, mlp_dim: int,
                   n_keys: Optional[Number] = None) -> float:
  """One pre-norm ViT block on `n_tokens` tokens of width D.

  qkv 3·N·D², QKᵀ N·Nk·D, AV N·Nk·D, proj N·D², MLP 2·N·D·mlp, two LayerNorms 2·5·N·D.
  GELU, softmax, scaling and residual adds are not counted (fvcore).

  Args:
    n_tokens: N, the tokens that are processed (queries).
    n_keys: Nk, the tokens attended to; defaults to N. Pass the bucket capacity here (and as
      n_tokens) for *executed* FLOPs of a masked, padded bucket.
  """
  return attention_half_macs(n_tokens, width, n_keys) + mlp_half_macs(n_tokens, width, mlp_dim)


def attention_half_macs(n_tokens: Number, width: int, n_keys: Optional[Number] = None) -> float:
  """A block's attention half: LayerNorm, qkv, QKᵀ, AV, proj (see vit_block_macs)."""
  n, d = n_tokens, width
  nk = n if n_keys is None else n_keys
  return float(layer_norm_macs(n, d) + 3 * n * d * d + 2 * n * nk * d + n * d * d)


def mlp_half_macs(n_tokens: Number, width: int, mlp_dim: int) -> float:
  """A block's MLP half: LayerNorm, fc1, fc2 (see vit_block_macs)."""
  return float(layer_norm_macs(n_tokens, width) + 2 * n_tokens * width * mlp_dim)


def encoder_macs(tokens: Number, depth: int, width: int, mlp_dim: int,
                 merges: Sequence = (), exits: Sequence[int] = (),
                 stage_tokens: Optional[Sequence[Number]] = None) -> float:
  """The `depth` ViT blocks, each half on the tokens it really has: `tokens` at first; from a
  merge (block, n) on (1-based; ALGM: between the block's attention and its MLP) n tokens;
  after exit s (block exits[s]) stage_tokens[s + 1] (halting; stage_tokens[0], the first
  segment's count, is `tokens` or the last merge's n and not read)."""
  attn, mlp = [tokens] * depth, [tokens] * depth
  for layer, n in merges:
    mlp[layer - 1:] = [n] * (depth - layer + 1)
    attn[layer:] = [n] * (depth - layer)
  for s, e in enumerate(exits):
    attn[e:] = mlp[e:] = [stage_tokens[s + 1]] * (depth - e)
  return float(sum(attention_half_macs(a, width) + mlp_half_macs(m, width, mlp_dim)
                   for a, m in zip(attn, mlp)))


def global_match_macs(n_tokens: Number, width: int) -> float:
  """ALGM's global merge matching n tokens: ceil(n/2)·floor(n/2)·D (the similarities of set A
  to set B, a matmul in the reference, which fvcore counts; the local merge's window
  similarities are elementwise products, which it does not)."""
  return float(math.ceil(n_tokens / 2) * math.floor(n_tokens / 2) * width)


def atm_decoder_layer_macs(num_queries: Number, n_tokens: Number, dim: int) -> float:
  """One ATM decoder layer (post-norm torch TransformerDecoderLayer + ATM cross-attention).

  self-attention: in_proj 3·Q·d², QKᵀ and AV 2·Q²·d, out_proj Q·d²;
  cross-attention: q Q·d², k and v 2·N·d², logits Q·N·d, AV Q·N·d, proj Q·d²;
  FFN d→4d→d: 2·Q·d·4d; three LayerNorms on [Q, d].
  """
  q, n, d = num_queries, n_tokens, dim
  self_attn = 3 * q * d * d + 2 * q * q * d + q * d * d
  cross_attn = q * d * d + 2 * n * d * d + 2 * q * n * d + q * d * d
  ffn = 2 * q * d * 4 * d
  norms = 3 * layer_norm_macs(q, d)
  return float(self_attn + cross_attn + ffn + norms)


def atm_head_macs(n_tokens_per_stage: Sequence[Number], num_queries: Number, dim: int,
                  in_width: Union[int, Sequence[int]], num_layers: int, num_classes_out: int,
                  upsample_hw: Optional[Sequence[int]] = None) -> float:
  """SegViT ATM head (or one DToP PruneHead when given one stage).

  Per stage: input_proj N·C_in·d + LayerNorm(N, d), `num_layers` decoder layers, class_embed
  Q·d·K (K = num_classes_out: C+1 for SegViT, 2 for DToP's binary head). Stage mask logits are
  summed on the token grid (elementwise, not counted). Finally, when `upsample_hw` = (H, W) is
  given, the bilinear upsampling of the Q mask maps to pixels: 4·Q·H·W.

  (SegViT's torch head applies class_embed to every decoder layer's queries and interpolates
  each layer's map to the same grid; both are < 0.1 % of the head and we count what our
  `atm.ATMHead` runs: class_embed once per stage.)
  """
  widths = ([in_width] * len(n_tokens_per_stage) if isinstance(in_width, int)
            else list(in_width))
  if len(widths) != len(n_tokens_per_stage):
    raise ValueError(f"in_width has {len(widths)} entries for {len(n_tokens_per_stage)} stages")
  total = 0.0
  for n, c_in in zip(n_tokens_per_stage, widths):
    total += n * c_in * dim + layer_norm_macs(n, dim)
    total += num_layers * atm_decoder_layer_macs(num_queries, n, dim)
    total += num_queries * dim * num_classes_out
  if upsample_hw is not None:
    total += BILINEAR_MACS_PER_OUTPUT * num_queries * upsample_hw[0] * upsample_hw[1]
  return float(total)


def semantic_inference_macs(num_queries: Number, num_classes: int, height: int,
                            width: int) -> float:
  """einsum('bqc,bqhw->bchw') of SegViT's `semantic_inference`: Q·C·H·W.

  Not part of our default count: the STEP paper's SegViT figures (113 @ B/512 ADE, 110 @ B/512
  Cityscapes, 373 @ L/512 COCO-Stuff) fit the model *without* it, while the SegViT README's
  (120.9 @ B/512 ADE, 383.9 @ L/512 COCO-Stuff) fit the model *with* it.
  """
  return float(num_queries * num_classes * height * width)


def segvit_macs(variant: str, image_size: Sequence[int], num_classes: int,
                out_layers: Sequence[int], head_dim: int, head_layers: int = 3,
                include_semantic: bool = False) -> Dict[str, float]:
  """MACs of a plain SegViT forward on one H×W image: dict(backbone, heads, total, tokens).

  backbone = patch embedding + all `depth` blocks (the segmenter runs every block, whatever
  `out_layers` is); heads = ATM head with one stage per out layer, Q = C queries, a (C+1)-way
  class head, mask upsampling to H×W (+ the semantic einsum if `include_semantic`).
  """
  v = vit_lib.decode_variant(variant)
  p, d = v["patch_size"], v["width"]
  h, w = int(image_size[0]), int(image_size[1])
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
  n = (h // p) * (w // p)
  out_layers = tuple(out_layers)
  if not out_layers or min(out_layers) < 1 or max(out_layers) > v["depth"]:
    raise ValueError(f"out_layers={out_layers} must be 1-based layers within depth "
                     f"{v['depth']} of {variant}")
  backbone = patch_embed_macs(n, d, p) + v["depth"] * vit_block_macs(n, d, v["mlp_dim"])
  heads = atm_head_macs([n] * len(out_layers), num_classes, head_dim, d, head_layers,
                        num_classes + 1, upsample_hw=(h, w))
  if include_semantic:
    heads += semantic_inference_macs(num_classes, num_classes, h, w)
  return dict(backbone=backbone, heads=heads, total=backbone + heads, tokens=n)


def _require(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise KeyError(f"config has no `{dotted}` (needed for FLOP counting)") from None
  return node


def model_macs(config, include_semantic: bool = False) -> Dict[str, float]:
  """GFLOPs (fvcore convention: 1e9 multiply-adds) of a plain SegViT config.

  Reads:
    config.num_classes           C (queries = C, class head C+1)
    config.data.image_size       (H, W) of the evaluated crop
    config.model.variant         e.g. 'B/16' (step_jax.models.vit.decode_variant)
    config.model.out_layers      1-based blocks feeding the ATM head, e.g. (6, 8, 12)
    config.model.head_dim        ATM width d
    config.model.head_layers     decoder layers per stage (optional, default 3 as
                                 builder.build)
  Raises KeyError naming the first missing key.

  Returns dict(backbone, heads, total) in GFLOPs (1e9 MACs).
  """
  image_size = tuple(_require(config, "data.image_size"))
  if len(image_size) != 2:
    raise ValueError(f"config.data.image_size must be (H, W), got {image_size}")
  model = _require(config, "model")
  head_layers = model.get("head_layers", HEAD_LAYERS) if hasattr(model, "get") else HEAD_LAYERS
  m = segvit_macs(_require(config, "model.variant"), image_size,
                  int(_require(config, "num_classes")), _require(config, "model.out_layers"),
                  int(_require(config, "model.head_dim")), int(head_layers),
                  include_semantic=include_semantic)
  return {k: m[k] / 1e9 for k in ("backbone", "heads", "total")}


def efficientnet_lite0_macs(height: int, width: int, last_stage: int = 6) -> float:
  """EfficientNet-Lite0 features up to `last_stage` (the policy net's stride-32 map) with TF
  'SAME' padding (output side = ceil(input / stride)); BatchNorm folds into the convs at
  inference, as fvcore counts a frozen BN (1 per element, included)."""
  h, w = -(-height // 2), -(-width // 2)
  c = efficientnet.STEM_WIDTH
  macs = 9 * 3 * c * h * w + c * h * w
  for s, (expand, k, stride, out, repeats) in enumerate(efficientnet.STAGES[:last_stage + 1]):
    for j in range(repeats):
      st = stride if j == 0 else 1
      mid = c * expand
      if expand != 1:
        macs += c * mid * h * w + mid * h * w
      h, w = -(-h // st), -(-w // st)
      macs += k * k * mid * h * w + mid * h * w          # depthwise
      macs += mid * out * h * w + out * h * w            # project
      c = out
  return float(macs)


def policy_macs(height: int, width: int, hidden: int = 128, patch: int = 16,
                sizes=(2, 4, 8, 16)) -> float:
  """The dCTS policy net: EfficientNet-Lite0 to stride 32, then per window size a 2-layer MLP
  on pooled (mean ‖ max) 320-channel features."""
  macs = efficientnet_lite0_macs(height, width)
  for k in sizes:
    n = (height // (patch * k)) * (width // (patch * k))
    macs += n * (2 * 320 * hidden + hidden)
  return macs


def token_macs(config, tokens: Number, stage_tokens: Optional[Sequence[Number]] = None,
               image_size: Optional[Sequence[int]] = None,
               merged_tokens: Optional[Sequence[Number]] = None) -> Dict[str, float]:
  """GFLOPs of a STEP-family model (any `configs/step.py` method) for given token counts.

  tokens: tokens entering the encoder (supertokens, or H·W/p² without sharing);
  stage_tokens: tokens processed by each encoder stage (len(exit_layers) + 1 entries, the
    first equal to `tokens`); None = no halting. Pass valid counts for the useful FLOPs and
    bucket capacities for the executed ones.
  merged_tokens: ALGM's merges inside the encoder (None: nothing merged): 'algm', the tokens
    after the local and after the global merge (`tokens` is the full grid, which the head
    reads: the merged tokens are unmerged for it; with exits stage_tokens[s] counts the
    merged tokens active in segment s); 'dcts_algm', the tokens after the global merge
    (`tokens`: the supertokens, which the head reads).
  Returns dict(policy, backbone, heads, total) in GFLOPs. The policy net is counted for
  'cts'/'dcts'/'dcts_algm'; the oracle merge reads labels and costs nothing.
  """
  m = config.model
  h, w = tuple(image_size or config.data.image_size)
  v = vit_lib.decode_variant(m.variant)
  p, d, depth = v["patch_size"], v["width"], v["depth"]
  c = int(config.num_classes)
  exits = tuple(m.get("exit_layers", ()))
  stage_tokens = list(stage_tokens) if stage_tokens is not None else [tokens] * (len(exits) + 1)
  if len(stage_tokens) != len(exits) + 1:
    raise ValueError(f"stage_tokens needs {len(exits) + 1} entries for exit_layers={exits}")
  layers = m.get("head_layers", HEAD_LAYERS)
  merge = m.get("merge", "none")
  backbone = patch_embed_macs(tokens, d, p)
  merges = ()
  if merge in ENCODER_MERGES:   # 'dcts_algm' merges in the global block only
    merge_layers = encoder_merge_layers(merge, m.algm_layers)
    merged = tuple(merged_tokens) if merged_tokens is not None else (tokens,) * len(merge_layers)
    if len(merged) != len(merge_layers):
      raise ValueError(f"merged_tokens={merged} needs one count per merge of "
                       f"merge={merge!r} (blocks {merge_layers})")
    merges = tuple(zip(merge_layers, merged))
    backbone += global_match_macs(((tokens,) + merged)[-2], d)   # tokens entering it
  elif merged_tokens is not None:
    raise ValueError(f"merged_tokens: merge={merge!r} merges nothing inside the encoder")
  backbone += encoder_macs(tokens, depth, d, v["mlp_dim"], merges, exits, stage_tokens)
  exit_head = builder.exit_head_of(m) if exits else None
  if exit_head == "segvit":  # SegViT's stage 0 at each exit on its active tokens; SegViT's
    # whole head at the end on every token (halted ones with their kept features)
    heads = sum(atm_head_macs([stage_tokens[s]], c, m.head_dim, d, layers, c + 1)
                for s in range(len(exits)))
    heads += atm_head_macs([tokens] * len(m.out_layers), c, m.head_dim, d, layers, c + 1)
  elif exit_head == "atm_shallow_first":  # SegViT's stages, each on its layer's active tokens
    stages = builder.head_out_layers(m.out_layers, exits, exit_head)
    segment = lambda layer: sum(layer > e for e in exits)
    heads = atm_head_macs([stage_tokens[segment(l)] for l in stages], c, m.head_dim, d,
                          layers, c + 1)
  elif exits:  # DToP: one single-stage head per exit and at the end, on its stage's tokens
    k = 2 if exit_head == "dtop" else c + 1
    heads = sum(atm_head_macs([n], c, m.head_dim, d, layers, k) for n in stage_tokens)
  else:
    heads = atm_head_macs([tokens] * len(m.out_layers), c, m.head_dim, d, layers, c + 1)
  heads += BILINEAR_MACS_PER_OUTPUT * c * h * w      # final mask logits to pixels
  policy = 0.0
  if merge in POLICY_MERGES:
    policy = policy_macs(h, w, m.policy.get("hidden", 128), p)
  return dict(policy=policy / 1e9, backbone=backbone / 1e9, heads=heads / 1e9,
              total=(policy + backbone + heads) / 1e9)


def xla_flops(fn, *args) -> float:
  """XLA's FLOP count of `jax.jit(fn)(*args)` (2 per multiply-add, elementwise ops included).

  `args` may be arrays or `jax.ShapeDtypeStruct` pytrees (nothing is executed). Returns
  float('nan') where the backend gives no cost analysis.
  """
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return float("nan")
  return float(cost["flops"])

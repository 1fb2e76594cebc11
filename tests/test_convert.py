"""Checkpoint conversion: timm / mmseg ViT and SegViT / DToP ATM heads, checked against
PyTorch forward passes with random weights (fp32, eval mode)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from numerics import assert_close  # noqa: E402

from step_jax.models import convert  # noqa: E402
from step_jax.models import atm  # noqa: E402
from step_jax.models import vit  # noqa: E402

nn = torch.nn
F = torch.nn.functional
REL = 1e-5


# ----------------------------------------------------------------------------- helpers

def _timm():
  """timm, imported by the first test that needs it: every test worker collects this file,
  and timm's import (torchvision, torch._dynamo) costs seconds."""
  pytest.importorskip("step_jax.testing.tv_shim")   # lets torchvision import; before timm
  return pytest.importorskip("timm")


def _new_timm_vit(**kw):
  return _timm().models.vision_transformer.VisionTransformer(**kw)


def _perturb(model, seed=0):
  """Random biases and LayerNorm affines (timm/torch init them to 0 / 1), so that a wrong
  mapping of any of them shows up."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 1.0 if ("norm" in name or name.split(".")[-2].startswith("ln")) and \
            name.endswith("weight") else 0.0
        p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
  return model.eval()


def _timm_vit(seed=0, **kw):
  torch.manual_seed(seed)
  cfg = dict(img_size=96, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0)
  cfg.update(kw)
  return _perturb(_new_timm_vit(**cfg), seed)


def _state_dict(model):
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _image(hw, seed=0, batch=2):
  return np.random.default_rng(seed).normal(size=(batch, 3, *hw)).astype(np.float32)


def _ours(params, img_nchw, **vit_kw):
  """Runs our ViT; returns (final [B, N, D], per-block outputs) as numpy."""
  model = vit.ViT(**vit_kw)
  x, outs = jax.jit(model.apply)({"params": params}, jnp.asarray(img_nchw.transpose(0, 2, 3, 1)))
  b, gh, gw, d = x.shape
  return np.asarray(x).reshape(b, gh * gw, d), [np.asarray(o) for o in outs]


def _timm_features(model, img_nchw, block=None):
  """forward_features (+ the output of `block`, captured with a hook) as numpy."""
  captured = {}
  hook = None
  if block is not None:
    hook = model.blocks[block].register_forward_hook(
        lambda m, i, o: captured.__setitem__("x", o.detach().numpy()))
  with torch.no_grad():
    out = model.forward_features(torch.from_numpy(img_nchw)).numpy()
  if hook is not None:
    hook.remove()
  return out, captured.get("x")


def _small_vit_kw(model, grid, final_norm):
  d = model.embed_dim
  return dict(width=d, depth=len(model.blocks), mlp_dim=4 * d,
              num_heads=model.blocks[0].attn.num_heads, posemb_grid=grid, final_norm=final_norm)


def _assert_trees_equal(a, b):
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


# ----------------------------------------------------------------------------- ViT parity

def test_vit_b16_matches_timm():
  """vit_base_patch16_224 layout without class token: final features and block 6."""
  torch.manual_seed(0)
  # fc_norm=False keeps the final LayerNorm in forward_features (with global_pool='avg'
  # timm would otherwise move it after pooling; see test_avgpool_fc_norm_is_dropped).
  m = _perturb(_new_timm_vit(img_size=224, patch_size=16, embed_dim=768, depth=12,
                                 num_heads=12, class_token=False, global_pool="avg",
                                 fc_norm=False, num_classes=0))
  params = convert.timm_vit_to_params(m.state_dict())
  img = _image((224, 224), batch=1)
  want, want_6 = _timm_features(m, img, block=5)
  got, outs = _ours(params, img, width=768, depth=12, mlp_dim=3072, num_heads=12,
                    posemb_grid=(14, 14), final_norm=True)
  assert_close(outs[5], want_6, REL)
  assert_close(got, want, REL)


def test_avgpool_fc_norm_is_dropped():
  """timm global_pool='avg' (fc_norm=None) applies its final norm after pooling: the token
  features are un-normalised, so the converted model has final_norm=False."""
  m = _timm_vit(class_token=False, global_pool="avg")
  assert "fc_norm.weight" in m.state_dict() and "norm.weight" not in m.state_dict()
  params = convert.timm_vit_to_params(m.state_dict())
  assert "norm" not in params
  img = _image((96, 96))
  got, _ = _ours(params, img, **_small_vit_kw(m, (6, 6), final_norm=False))
  assert_close(got, _timm_features(m, img)[0], REL)


def test_resampled_posemb_matches_timm_at_new_resolution():
  m224 = _timm_vit(img_size=224, embed_dim=96, depth=3, num_heads=3, class_token=False,
                   fc_norm=False, global_pool="avg")
  sd = _state_dict(m224)
  d = m224.embed_dim
  # Reference: the same weights in a 256x320 timm model, pos-emb resized with PyTorch.
  grid = sd["pos_embed"].reshape(1, 14, 14, d).permute(0, 3, 1, 2)
  resized = F.interpolate(grid, size=(16, 20), mode="bicubic", align_corners=False)
  m_big = _new_timm_vit(img_size=(256, 320), patch_size=16, embed_dim=d, depth=3,
                            num_heads=3, class_token=False, fc_norm=False, global_pool="avg",
                            num_classes=0).eval()
  m_big.load_state_dict({**sd, "pos_embed": resized.permute(0, 2, 3, 1).reshape(1, -1, d)})
  img = _image((256, 320), seed=1)
  want, want_1 = _timm_features(m_big, img, block=1)

  params = convert.timm_vit_to_params(sd, posemb_grid=(16, 20))
  assert params["pos_embedding"].shape == (16, 20, d)
  got, outs = _ours(params, img, **_small_vit_kw(m224, (16, 20), final_norm=True))
  assert_close(outs[1], want_1, REL)
  assert_close(got, want, REL)
  # Keeping the 14x14 grid and letting the ViT resample at run time gives the same.
  got_rt, _ = _ours(convert.timm_vit_to_params(sd), img,
                    **_small_vit_kw(m224, (14, 14), final_norm=True))
  assert_close(got_rt, want, REL)


def test_class_token_checkpoint_drops_cls_before_blocks():
  m = _timm_vit(class_token=True, global_pool="token")
  sd = m.state_dict()
  assert sd["pos_embed"].shape == (1, 37, 64)
  params = convert.timm_vit_to_params(sd)
  assert params["pos_embedding"].shape == (6, 6, 64)
  np.testing.assert_array_equal(params["pos_embedding"],
                                sd["pos_embed"][0, 1:].reshape(6, 6, 64).numpy())
  assert params["embedding"]["kernel"].shape == (16 * 16 * 3, 64)
  # mmseg with_cls_token=False: cls token and its pos-emb removed before the first block.
  img = _image((96, 96), seed=2)
  with torch.no_grad():
    x = m.patch_embed(torch.from_numpy(img)) + m.pos_embed[:, 1:]
    want = m.norm(m.blocks(x)).numpy()
  got, _ = _ours(params, img, **_small_vit_kw(m, (6, 6), final_norm=True))
  assert_close(got, want, REL)


@pytest.mark.parametrize("kw,n_prefix", [
    (dict(class_token=True, no_embed_class=True), 0),             # DeiT-3 / big_vision
    (dict(class_token=True, reg_tokens=4, no_embed_class=True), 0),
    (dict(class_token=True, reg_tokens=2), 3),                    # prefix entries in pos_embed
    (dict(class_token=False, global_pool="avg", qkv_bias=False, fc_norm=False), 0),
])
def test_prefix_token_layouts(kw, n_prefix):
  m = _timm_vit(**kw)
  sd = m.state_dict()
  params = convert.timm_vit_to_params(sd)
  np.testing.assert_array_equal(params["pos_embedding"],
                                sd["pos_embed"][0, n_prefix:].reshape(6, 6, 64).numpy())
  if not kw.get("qkv_bias", True):
    np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["bias"], 0)
    img = _image((96, 96), seed=3)
    got, _ = _ours(params, img, **_small_vit_kw(m, (6, 6), final_norm=True))
    assert_close(got, _timm_features(m, img)[0], REL)


def test_deit_distilled_checkpoint():
  VisionTransformerDistilled = _timm().models.deit.VisionTransformerDistilled
  torch.manual_seed(0)
  m = VisionTransformerDistilled(img_size=96, patch_size=16, embed_dim=64, depth=2,
                                 num_heads=2, num_classes=10).eval()
  sd = m.state_dict()
  assert "dist_token" in sd and sd["pos_embed"].shape == (1, 38, 64)
  params = convert.timm_vit_to_params(sd)
  np.testing.assert_array_equal(params["pos_embedding"],
                                sd["pos_embed"][0, 2:].reshape(6, 6, 64).numpy())


def test_round_trip_and_load_into_timm():
  m = _timm_vit(class_token=False, fc_norm=False, global_pool="avg")
  sd = {k: v.numpy() for k, v in m.state_dict().items()}
  back = convert.params_to_timm_vit(convert.timm_vit_to_params(sd))
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  m.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  # Non-square grid, and the {'params': ...} wrapper.
  params = convert.timm_vit_to_params(sd, posemb_grid=(4, 7))
  back = convert.params_to_timm_vit({"params": params})
  assert back["pos_embed"].shape == (1, 28, 64)
  _assert_trees_equal(convert.timm_vit_to_params(back, src_grid=(4, 7)), params)


def _timm_to_mmseg(sd):
  """timm → mmseg names, as mmseg's tools/model_converters/vit2mmseg.py `convert_vit`."""
  out = {}
  for k, v in sd.items():
    if k.startswith("head"):
      continue
    if k.startswith("norm."):
      k = k.replace("norm.", "ln1.")
    elif k.startswith("patch_embed"):
      k = k.replace("proj", "projection")
    elif k.startswith("blocks"):
      if "norm" in k:
        k = k.replace("norm", "ln")
      elif "mlp.fc1" in k:
        k = k.replace("mlp.fc1", "ffn.layers.0.0")
      elif "mlp.fc2" in k:
        k = k.replace("mlp.fc2", "ffn.layers.1")
      elif "attn.qkv" in k:
        k = k.replace("attn.qkv.", "attn.attn.in_proj_")
      elif "attn.proj" in k:
        k = k.replace("attn.proj", "attn.attn.out_proj")
      k = k.replace("blocks.", "layers.")
    out[k] = v
  return out


def test_mmseg_naming():
  m = _timm_vit(class_token=True, global_pool="token", num_classes=5)
  sd = m.state_dict()
  mm = _timm_to_mmseg(sd)
  assert "layers.0.attn.attn.in_proj_weight" in mm and "ln1.weight" in mm
  want = convert.timm_vit_to_params(sd)
  _assert_trees_equal(convert.timm_vit_to_params(mm), want)
  # A full mmseg segmentor checkpoint: {'state_dict': {'backbone.*', 'decode_head.*'}}.
  full = {"state_dict": {**{"backbone." + k: v for k, v in mm.items()},
                         "decode_head.q.weight": torch.zeros(3, 8)}, "meta": {}}
  _assert_trees_equal(convert.timm_vit_to_params(full), want)


def test_vit_errors_list_bad_keys():
  sd = dict(_timm_vit(class_token=False, fc_norm=False, global_pool="avg").state_dict())
  broken = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
  broken["blocks.0.ls1.gamma"] = torch.ones(64)
  broken["blocks.1.attn.proj.weight"] = torch.ones(64, 32)
  with pytest.raises(ValueError) as e:
    convert.timm_vit_to_params(broken)
  msg = str(e.value)
  assert "missing keys: blocks.1.mlp.fc2.bias" in msg
  assert "unexpected keys: blocks.0.ls1.gamma" in msg
  assert "blocks.1.attn.proj.weight: (64, 32) (expected (64, 64))" in msg
  with pytest.raises(ValueError, match="non-square"):
    convert.timm_vit_to_params({**sd, "pos_embed": torch.zeros(1, 35, 64)})
  with pytest.raises(ValueError, match="not a ViT state dict"):
    convert.timm_vit_to_params({"q.weight": torch.zeros(3, 3)})


# ----------------------------------------------------------------------------- ATM head

class RefCrossAttention(nn.Module):
  """SegViT's ATM attention: separate q/k/v/proj; returns the output and the pre-softmax
  scaled logits averaged over heads."""

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
    self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
    self.attn_drop = nn.Dropout(0.1)
    self.proj = nn.Linear(dim, dim)

  def forward(self, xq, xkv):  # batch-first [B, Q, d], [B, N, d]
    b, nq, c = xq.shape
    split = lambda t: t.reshape(b, t.shape[1], self.num_heads, -1).transpose(1, 2)
    q, k, v = split(self.q(xq)), split(self.k(xkv)), split(self.v(xkv))
    logits = (q @ k.transpose(-2, -1)) * self.scale                  # [B, H, Q, N]
    out = (self.attn_drop(logits.softmax(-1)) @ v).transpose(1, 2).reshape(b, nq, c)
    return self.proj(out), logits.mean(dim=1)


class RefDecoderLayer(nn.TransformerDecoderLayer):
  """Post-norm torch decoder layer whose cross-attention is RefCrossAttention."""

  def __init__(self, dim, num_heads):
    super().__init__(d_model=dim, nhead=num_heads, dim_feedforward=4 * dim, dropout=0.1)
    del self.multihead_attn
    self.multihead_attn = RefCrossAttention(dim, num_heads)

  def forward(self, tgt, memory):  # sequence-first [Q, B, d], [N, B, d]
    tgt = self.norm1(tgt + self.dropout1(self.self_attn(tgt, tgt, tgt)[0]))
    y, attn = self.multihead_attn(tgt.transpose(0, 1), memory.transpose(0, 1))
    tgt = self.norm2(tgt + self.dropout2(y.transpose(0, 1)))
    y = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
    return self.norm3(tgt + self.dropout3(y)), attn


class RefDecoder(nn.TransformerDecoder):
  def forward(self, tgt, memory):  # returns the last layer's attention logits
    for layer in self.layers:
      tgt, attn = layer(tgt, memory)
    return tgt, attn


class RefATMHead(nn.Module):
  """SegViT ATMHead forward at token level (mask logits [B, Q, N], no reshape/upsampling)."""

  def __init__(self, in_channels, dim, num_heads, num_classes, num_layers, num_stages,
               binary_cls=False):
    super().__init__()
    self.num_stages = num_stages
    for s in range(1, num_stages + 1):
      self.add_module(f"input_proj_{s}", nn.Linear(in_channels, dim))
      self.add_module(f"proj_norm_{s}", nn.LayerNorm(dim))
      self.add_module(f"decoder_{s}", RefDecoder(RefDecoderLayer(dim, num_heads), num_layers))
    self.q = nn.Embedding(num_classes, dim)
    self.class_embed = nn.Linear(dim, 2 if binary_cls else num_classes + 1)

  def forward(self, features):  # shallowest first, [B, N, D_in] each
    x = list(reversed(features))
    q = self.q.weight.unsqueeze(1).repeat(1, x[0].shape[0], 1)       # [Q, B, d]
    qs, masks, total = [], [], 0
    for s, x_ in enumerate(x, start=1):
      memory = getattr(self, f"proj_norm_{s}")(getattr(self, f"input_proj_{s}")(x_))
      q, attn = getattr(self, f"decoder_{s}")(q, memory.transpose(0, 1))
      total = total + attn
      masks.append(total)
      qs.append(q.transpose(0, 1))
    logits = self.class_embed(torch.stack(qs))
    aux = [dict(pred_logits=l, pred_masks=m) for l, m in zip(logits[:-1], masks[:-1])]
    return dict(pred_logits=logits[-1], pred_masks=masks[-1], aux=aux)


def _compare_heads(ref, ours_module, params, features):
  with torch.no_grad():
    want = ref([torch.from_numpy(f) for f in features])
  got = ours_module.apply({"params": params}, [jnp.asarray(f) for f in features])
  pairs = [(got, want)] + list(zip(got["aux"], want["aux"]))
  assert len(got["aux"]) == len(want["aux"])
  for g, w in pairs:
    assert_close(g["pred_logits"], w["pred_logits"].numpy(), REL)
    assert_close(g["pred_masks"], w["pred_masks"].numpy(), REL)


def _features(num, b=2, n=24, d_in=48, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(b, n, d_in)).astype(np.float32) for _ in range(num)]


def test_atm_head_matches_segvit_reference():
  torch.manual_seed(0)
  ref = RefATMHead(48, 64, 4, num_classes=7, num_layers=3, num_stages=3)
  _perturb(ref, seed=1)
  with torch.no_grad():
    ref.q.weight.normal_()
  sd = {"decode_head." + k: v for k, v in ref.state_dict().items()}
  params = convert.segvit_head_to_params(sd)
  assert params["input_proj_0"]["kernel"].shape == (48, 64)  # torch input_proj_1, deepest
  np.testing.assert_array_equal(params["input_proj_0"]["bias"], ref.input_proj_1.bias.detach())
  head = atm.ATMHead(7, dim=64, num_heads=4, num_layers=3, num_stages=3)
  shapes = jax.eval_shape(head.init, jax.random.key(0), [jnp.zeros((1, 24, 48))] * 3)["params"]
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
  _compare_heads(ref, head, params, _features(3))


def test_dtop_prune_head_naming():
  torch.manual_seed(1)
  ref = _perturb(RefATMHead(48, 64, 4, num_classes=7, num_layers=2, num_stages=1,
                            binary_cls=True), seed=2)
  # PruneHead: one unnumbered stage (input_proj, proj_norm, decoder), class_embed [2, d].
  sd = {k.replace("input_proj_1", "input_proj").replace("proj_norm_1", "proj_norm")
        .replace("decoder_1", "decoder"): v for k, v in ref.state_dict().items()}
  params = convert.segvit_head_to_params({"auxiliary_head.0." + k: v for k, v in sd.items()},
                                         prefix="auxiliary_head.0.")
  head = atm.ATMHead(7, dim=64, num_heads=4, num_layers=2, num_stages=1, binary_cls=True)
  _compare_heads(ref, head, params, _features(1, seed=1))


def test_head_errors_list_bad_keys():
  ref = RefATMHead(48, 64, 4, num_classes=7, num_layers=2, num_stages=2)
  sd = {k: v for k, v in ref.state_dict().items() if k != "decoder_2.layers.1.norm3.bias"}
  sd["decoder_1.norm.weight"] = torch.ones(64)  # a TransformerDecoder final norm: unsupported
  with pytest.raises(ValueError) as e:
    convert.segvit_head_to_params(sd)
  assert "missing keys: decoder_2.layers.1.norm3.bias" in str(e.value)
  assert "unexpected keys: decoder_1.norm.weight" in str(e.value)
  with pytest.raises(ValueError, match="not an ATM head"):
    convert.segvit_head_to_params({"backbone.pos_embed": torch.zeros(1, 4, 8)})


# ----------------------------------------------------------------------------- segmentors

def _prune_head_sd(seed, num_classes=5):
  """A DToP PruneHead state dict (one unnumbered stage, binary class head), random."""
  torch.manual_seed(seed)
  ref = _perturb(RefATMHead(64, 32, 4, num_classes=num_classes, num_layers=1, num_stages=1,
                            binary_cls=True), seed)
  return {k.replace("input_proj_1", "input_proj").replace("proj_norm_1", "proj_norm")
          .replace("decoder_1", "decoder"): v for k, v in ref.state_dict().items()}


def test_dtop_segmentor_checkpoint_fits_our_segmenter():
  from step_jax.models import segmenter  # pylint: disable=g-import-not-at-top
  ref = _timm_vit(class_token=True, global_pool="token")
  backbone = {"backbone." + k: v for k, v in _timm_to_mmseg(ref.state_dict()).items()
              if not k.startswith("ln1.")}                   # SegViT/DToP: final_norm=False
  final, exit0 = _prune_head_sd(1), _prune_head_sd(2)
  sd = {"state_dict": {**backbone, **{"decode_head." + k: v for k, v in final.items()},
                       **{"auxiliary_head.0." + k: v for k, v in exit0.items()}}, "meta": {}}
  params = convert.segmentor_to_params(sd, posemb_grid=(8, 8))
  head = lambda: atm.ATMHead(5, dim=32, num_heads=4, num_layers=1, num_stages=1,
                             binary_cls=True)
  model = segmenter.Segmenter(vit.ViT(width=64, depth=2, mlp_dim=256, num_heads=2,
                                      posemb_grid=(8, 8)), head(), out_layers=(2,),
                              exit_layers=(1,), exit_heads=(head(),), exit_head="dtop")
  x = jnp.zeros((1, 128, 128, 3))
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
  jax.eval_shape(model.apply, {"params": params}, x)       # the tree drives the model
  # The final head is decode_head, the exit head auxiliary_head.0 (not swapped).
  np.testing.assert_array_equal(params["head"]["queries"], final["q.weight"].numpy())
  np.testing.assert_array_equal(params["exit_heads_0"]["queries"], exit0["q.weight"].numpy())
  _assert_trees_equal(params["backbone"], convert.timm_vit_to_params(
      {k[len("backbone."):]: v for k, v in backbone.items()}, posemb_grid=(8, 8)))
  # One auxiliary head is stored without an index.
  single = {k.replace("auxiliary_head.0.", "auxiliary_head."): v
            for k, v in sd["state_dict"].items()}
  _assert_trees_equal(convert.segmentor_to_params(single, posemb_grid=(8, 8)), params)
  with pytest.raises(ValueError, match="not an mmseg segmentor"):
    convert.segmentor_to_params(ref.state_dict())

"""Plain ViT encoder (no CLS token) as SegViT/DToP/STEP use it.

The module is split into methods so that the segmenter can drive it piece by piece:
`patchify` → `embed_patches` (+ `posemb`) → `run_blocks(start, stop)` per stage, or a
block's two halves (`attend`, `feed_forward`: ALGM merges tokens between them). Supertokens
(dCTS) reuse the same patch embedding on resized superpatches, and early exit runs the
blocks stage by stage with a key mask or on a compacted token set.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from step_jax.models import attention
from step_jax.models import resize

Dtype = Any

# width, depth, mlp_dim, heads (patch size comes from the "/16" suffix).
VARIANTS = {
    "Mu": (64, 4, 256, 2),      # test/CPU-smoke size, not a published model
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}


def decode_variant(variant: str) -> dict:
  """'B/16' → dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  name, _, patch = variant.partition("/")
  if name not in VARIANTS or not patch.isdigit():
    raise ValueError(f"unknown ViT variant {variant!r}; expected one of "
                     f"{[k + '/16' for k in VARIANTS]} (any patch size after '/')")
  width, depth, mlp_dim, heads = VARIANTS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(patch))


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example."""
  rate: float

  @nn.compact
  def __call__(self, x, *, train):
    if not train or self.rate == 0.0:
      return x
    keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, (x.shape[0],))
    return x * keep[:, None, None].astype(x.dtype) / (1.0 - self.rate)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False):
    d = x.shape[-1]
    dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype,
                                     kernel_init=nn.initializers.xavier_uniform(),
                                     bias_init=nn.initializers.normal(1e-6), name=name)
    x = nn.gelu(dense(self.mlp_dim, "fc1")(x), approximate=False)  # timm/torch exact GELU
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(d, "fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block (LayerNorm eps 1e-6, as the JAX/AugReg ViT checkpoints).

  `attend` and `feed_forward` run its two residual halves separately, for hooks between the
  attention and the MLP (ALGM merges tokens there); `__call__` runs both.
  """
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dropout: float = 0.0
  attention_impl: str = "einsum"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    norm = lambda: nn.LayerNorm(1e-6, dtype=self.dtype, param_dtype=self.param_dtype)
    self.norm1 = norm()
    self.attn = attention.SelfAttention(self.num_heads, impl=self.attention_impl,
                                        dtype=self.dtype, param_dtype=self.param_dtype)
    self.norm2 = norm()
    self.mlp = MlpBlock(self.mlp_dim, self.dropout, dtype=self.dtype,
                        param_dtype=self.param_dtype)
    # The names the compact version gave them: stochastic depth keeps its random streams.
    self.DropPath_0 = DropPath(self.drop_path)
    self.DropPath_1 = DropPath(self.drop_path)

  def _attend(self, x, key_mask, train):
    return x + self.DropPath_0(self.attn(self.norm1(x), key_mask), train=train)

  def _feed_forward(self, x, train):
    return x + self.DropPath_1(self.mlp(self.norm2(x), train=train), train=train)

  def __call__(self, x, key_mask=None, train=False):  # positional `train` for nn.remat
    return self._feed_forward(self._attend(x, key_mask, train), train)

  def attend(self, x, key_mask=None, train=False):
    """The attention half: x + attn(norm1(x))."""
    return self._attend(x, key_mask, train)

  def feed_forward(self, x, key_mask=None, train=False):
    """The MLP half: x + mlp(norm2(x)). key_mask is unused: both halves take (x, key_mask,
    train), so that nn.remat's static_argnums fit them alike."""
    return self._feed_forward(x, train)


class ViT(nn.Module):
  """ViT encoder over 16-px patches; no CLS token; position embeddings resampled per grid.

  Attributes:
    posemb_grid: grid of the stored position embedding (e.g. (32, 32) for 512² training or
      (14, 14) for a 224² ImageNet checkpoint); resampled bicubically (PyTorch semantics,
      as mmseg's `resize_pos_embed`) to whatever grid the input has.
    drop_path: maximal stochastic-depth rate, increased linearly over the blocks.
    final_norm: SegViT uses the raw block outputs (False); timm applies a last LayerNorm.
    attention_impl: self-attention path, see attention.SelfAttention ('einsum' is the
      reference; builder.build defaults to 'auto').
    scan_blocks: at inference, run consecutive blocks as one `lax.scan` over their stacked
      parameters: a program compiles one block instead of one per layer, so models with many
      capacity buckets (one copy of the encoder per bucket) compile in a fraction of the
      time. Same values; the parameters keep their per-block names.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 16
  posemb_grid: Sequence[int] = (14, 14)
  drop_path: float = 0.0
  dropout: float = 0.0
  final_norm: bool = False
  remat: bool = False
  attention_impl: str = "einsum"
  scan_blocks: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=nn.initializers.lecun_normal())
    self.pos_embedding = self.param("pos_embedding", nn.initializers.normal(0.02),
                                    (*self.posemb_grid, self.width), self.param_dtype)
    # Each public method checkpointed on its own (the halves call unwrapped code: no nesting).
    block = nn.remat(Block, static_argnums=(3,), methods=["__call__", "attend", "feed_forward"]
                     ) if self.remat else Block
    rates = [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]
    self.blocks = [block(self.num_heads, self.mlp_dim, rate, self.dropout,
                         attention_impl=self.attention_impl, dtype=self.dtype,
                         param_dtype=self.param_dtype) for rate in rates]
    if self.final_norm:
      self.norm = nn.LayerNorm(1e-6, dtype=self.dtype, param_dtype=self.param_dtype)

  def patchify(self, images):
    """[B, H, W, C] → [B, H/p, W/p, p*p*C] in (row, col, channel) order within a patch."""
    b, h, w, c = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}; "
                       "resize or pad the input first")
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)

  def embed_patches(self, patches):
    """Linear patch embedding (= the 16x16/16 conv of timm) of flattened patches [..., p*p*3]."""
    return self.embedding(patches)

  def posemb(self, grid_hw):
    """Position embeddings [gh, gw, D], bicubically resampled from the stored grid."""
    return resize.resize_2d(self.pos_embedding.astype(jnp.float32), grid_hw, "bicubic",
                            axes=(0, 1)).astype(self.dtype)

  def embed(self, images):
    """Images [B, H, W, 3] (already normalised) → tokens [B, gh, gw, D]."""
    x = self.embed_patches(self.patchify(images.astype(self.dtype)))
    return x + self.posemb(x.shape[1:3])[None]

  def run_blocks(self, x, key_mask=None, start=0, stop=None, *, train=False):
    """Runs blocks [start, stop) on tokens [B, N, D]; returns the output of every block."""
    blocks = self.blocks[start:stop]
    if self.scan_blocks and not train and len(blocks) > 1 and not self.is_initializing():
      return self._scan_blocks(blocks, x, key_mask)
    outs = []
    for blk in blocks:
      x = blk(x, key_mask, train)
      outs.append(x)
    return outs

  def attend(self, i, x, key_mask=None, *, train=False):
    """Block i's (0-based) attention half on tokens [B, N, D]."""
    return self.blocks[i].attend(x, key_mask, train)

  def feed_forward(self, i, x, *, train=False):
    """Block i's (0-based) MLP half on tokens [B, N, D]."""
    return self.blocks[i].feed_forward(x, None, train)

  def _scan_blocks(self, blocks, x, key_mask):
    """`blocks` as one lax.scan: their parameters stacked on a leading axis, one unbound
    block applied per step (inference: no dropout, no stochastic depth)."""
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[b.variables["params"] for b in blocks])
    block = Block(self.num_heads, self.mlp_dim, 0.0, self.dropout,
                  attention_impl=self.attention_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype, parent=None)

    def step(h, params):
      h = block.apply({"params": params}, h, key_mask, False)
      return h, h
    _, outs = jax.lax.scan(step, x, stacked)
    return [outs[i] for i in range(len(blocks))]

  def __call__(self, images, *, train=False):
    """Plain forward: [B, H, W, 3] → ([B, gh, gw, D], per-block outputs [B, N, D])."""
    tokens = self.embed(images)
    b, gh, gw, d = tokens.shape
    outs = self.run_blocks(tokens.reshape(b, gh * gw, d), train=train)
    x = self.norm(outs[-1]) if self.final_norm else outs[-1]
    return x.reshape(b, gh, gw, d), outs

"""Minimal deterministic batching over random-access sources (numpy).

Yields dict(image uint8 [B,H,W,3], label int32 [B,H,W], valid bool [B]). Training batches are
an endless, epoch-seeded shuffle with random horizontal flips; evaluation batches cover the
split once and pad the last batch (valid=False) so shapes stay static under jit.
"""
import numpy as np


def _stack(examples):
  return dict(image=np.stack([e["image"] for e in examples]),
              label=np.stack([e["label"] for e in examples]).astype(np.int32))


def train_batches(source, batch_size, seed, start_step=0):
  """Endless batches; step s of epoch e uses permutation (seed, e): resumable at any step."""
  n = len(source)
  if n < batch_size:
    raise ValueError(f"training split has {n} examples, fewer than batch_size={batch_size}")
  per_epoch = n // batch_size
  step = start_step
  while True:
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    flips = np.random.default_rng((seed, epoch, 1)).random(n) < 0.5
    idx = perm[k * batch_size:(k + 1) * batch_size]
    exs = []
    for i in idx:
      ex = source[int(i)]
      if flips[i]:
        ex = dict(image=ex["image"][:, ::-1], label=ex["label"][:, ::-1])
      exs.append(ex)
    batch = _stack(exs)
    batch["valid"] = np.ones(batch_size, bool)
    yield batch
    step += 1


def eval_batches(source, batch_size):
  """One pass over the split; the last batch is padded by repeating example 0, valid=False."""
  n = len(source)
  for start in range(0, n, batch_size):
    idx = list(range(start, min(start + batch_size, n)))
    pad = batch_size - len(idx)
    batch = _stack([source[i] for i in idx + [0] * pad])
    batch["valid"] = np.array([True] * len(idx) + [False] * pad)
    yield batch

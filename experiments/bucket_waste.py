"""Issue 16: the padding of each bucket design for supertokens, from the merge's token counts
alone (no ViT forward, so ViT-B/16 at 1024² costs seconds): useful and executed GFLOPs per
image at batch 1 and 8, batches in input order or grouped by token count.

  python experiments/bucket_waste.py --config=configs/step.py:method=dcts,variant=B/16,dataset=camvid,res=1024 \
      --config.model.policy.init_from=POLICY --num_images=32 --out=experiments/results/bucket_waste

Exact for models without exits (dCTS, CTS): the executed GFLOPs are the analytic cost at the
capacity the batch runs in (the smallest of the ladder that holds its largest count), what
`benchmark` reports for the same batches. Models with exits need the forward
(bucket_compile.py), since halting depends on the network.
"""
import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from step_jax.analysis import benchmark  # noqa: E402
from step_jax.evaluation import dispatch  # noqa: E402
from step_jax.evaluation import tokens  # noqa: E402
from step_jax.models import capacity  # noqa: E402
from step_jax.models import flops  # noqa: E402
from step_jax.models import segmenter  # noqa: E402
from step_jax.models import supertokens  # noqa: E402
from step_jax.models import vit as vit_lib  # noqa: E402

LADDERS = {
    "eighths (7)": segmenter.BUCKETS,
    "geometric 1.1": capacity.geometric_buckets(1.1),
    "geometric 1.05": capacity.geometric_buckets(1.05),
}


def waste(config, counts, ladder, batch, group):
  """(useful, executed) mean GFLOPs per image when `counts` run `batch` at a time."""
  h, w = config.data.image_size
  p = vit_lib.decode_variant(config.model.variant)["patch_size"]
  caps = supertokens.bucket_capacities((h // p) * (w // p), ladder)
  useful, executed, used = [], [], set()
  for g in dispatch.batch_indices(len(counts), batch, counts if group else None):
    cap = dispatch.pick_capacity(int(np.max(counts[g])), caps)
    used.add(cap)
    for i in g:
      useful.append(flops.token_macs(config, int(counts[i]))["total"])
      executed.append(flops.token_macs(config, cap)["total"])
  return float(np.mean(useful)), float(np.mean(executed)), len(used)


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  if config.model.get("exit_layers", ()):
    raise app.UsageError("exits need the forward: use bucket_compile.py")
  images = tokens.load_images(config, f.images, f.num_images)
  _, model, variables, weights = benchmark.prepare(config, images=images)
  counter = dispatch.HostBuckets(model)
  counts = np.concatenate([counter.token_counts(variables, images[i:i + 8])
                           for i in range(0, len(images), 8)])
  rows = []
  for name, ladder in LADDERS.items():
    for batch in f.batch:
      for group in ((False,) if batch == 1 else (False, True)):
        useful, executed, used = waste(config, counts, ladder, batch, group)
        rows.append(dict(ladder=name, buckets=len(ladder), batch=batch, grouped=group,
                         capacities_used=used, gflops_useful=round(useful, 2),
                         gflops_executed=round(executed, 2),
                         executed_over_useful=round(executed / useful, 4)))
        print(json.dumps(rows[-1]), flush=True)
  p = model.backbone.patch_size
  n_full = (config.data.image_size[0] // p) * (config.data.image_size[1] // p)
  head = dict(method=config.method, variant=config.model.variant,
              image_size=list(config.data.image_size), dataset=config.data.name,
              images=len(images), weights=weights, tokens_full=n_full,
              tokens_min=int(counts.min()), tokens_mean=float(counts.mean()),
              tokens_max=int(counts.max()))
  print(json.dumps(head))
  if f.out:
    os.makedirs(f.out, exist_ok=True)
    with open(os.path.join(f.out, f"{config.data.name}.jsonl"), "w") as fh:
      fh.write(json.dumps(head) + "\n")
      for r in rows:
        fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config (path:arg), a model without exits.")
  flags.DEFINE_string("images", "", "Folder of images; default: the config's eval split.")
  flags.DEFINE_integer("num_images", 32, "Images.")
  flags.DEFINE_multi_integer("batch", [1, 8], "Batch sizes.")
  flags.DEFINE_string("out", "", "Output folder (<dataset>.jsonl).")
  app.run(main)

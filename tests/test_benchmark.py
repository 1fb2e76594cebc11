"""The benchmark reports consistent numbers (it is a tool, so only its bookkeeping is tested)."""
import numpy as np

from numerics import assert_close  # tests/numerics.py

from configs import step as step_configs
from step_jax.analysis import benchmark
from step_jax.evaluation import tokens


def _cfg(method, **kw):
  cfg = step_configs.get_config(f"method={method},variant=Mu/16,dataset=synthetic,smoke")
  cfg.data.image_size = (64, 64)
  cfg.model.posemb_grid = (4, 4)
  cfg.model.exit_buckets = (0.5, 1.0)
  cfg.model.update(kw)
  return cfg


def test_measure_dtop_compaction_counts_fewer_flops_than_segvit():
  images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
  base = benchmark.measure(_cfg("segvit"), images=images, reps=1, warmup=0)
  # keep_top_k=0: on a 4x4 grid the top-5-per-class rule would keep most candidates.
  # SegViT's stages as the exits (no extra head; the default 'segvit' design adds one stage
  # per exit, which on this 16-token model costs more than the halting saves).
  dtop = benchmark.measure(_cfg("dtop", exit_layers=(2,), keep_top_k=0,
                                exit_head="atm_shallow_first"), images=images,
                           reps=1, warmup=0,
                           exit_share=0.5)
  for r in (base, dtop):
    assert r["ms_per_image_min"] <= r["ms_per_image_median"] <= r["ms_per_image_max"]
    assert r["ms_per_image_min"] <= r["ms_per_image_mean"] <= r["ms_per_image_max"]
    assert r["gflops_executed"] >= r["gflops_useful"] > 0
    assert r["weights"] == "random" and r["images"] == 3
  assert base["mean_tokens_per_stage"] == [16.0]
  first, second = dtop["mean_tokens_per_stage"]
  assert first == 16.0 and 6.0 <= second <= 10.0      # about half halted at the exit
  # Per stage: compiled slots hold the tokens; the overall waste is executed / useful.
  caps = dtop["mean_capacity_per_stage"]
  assert caps[0] == 16.0 and 8.0 <= caps[1] <= 16.0 and caps[1] >= second   # buckets 8, 16
  assert_close(dtop["capacity_over_tokens_per_stage"],
               np.divide(caps, dtop["mean_tokens_per_stage"]), 0.01)   # rounded ratios
  assert dtop["executed_over_useful"] == round(dtop["gflops_executed"] / dtop["gflops_useful"], 4)
  # SegViT's stages as exits cost no extra head, and half the tokens skip blocks 3-4: fewer
  # FLOPs than SegViT, useful and executed.
  assert dtop["gflops_useful"] < dtop["gflops_executed"] < base["gflops_useful"]


def test_exit_calibration_never_halts_more_than_the_share_on_ties():
  """Random heads can saturate many tokens to one confidence: the quantile alone would then
  halt every tied token (a 40 % request once halted 99.8 % at ViT-B/16)."""
  spread = np.linspace(0, 1, 101, dtype=np.float32)
  tau = tokens._threshold_for_share(spread, 0.4)   # pylint: disable=protected-access
  assert np.sum(spread >= tau) in (40, 41)   # 40 % of 101 confidences, one more at most
  tied = np.concatenate([np.full(90, 0.7, np.float32), np.linspace(0, .5, 10, dtype=np.float32)])
  tau = tokens._threshold_for_share(tied, 0.4)     # pylint: disable=protected-access
  assert np.mean(tied >= tau) <= 0.4
  # The threshold lies between two confidences, never on one (float noise would flip it).
  for conf in (spread, tied, np.random.default_rng(0).random(1000, np.float32)):
    for share in (0.0, 0.1, 0.4, 1.0):
      tau = tokens._threshold_for_share(conf, share)   # pylint: disable=protected-access
      assert not np.any(conf == np.float32(tau)) and np.mean(conf > tau) <= share + 1e-9
  everything = tokens._threshold_for_share(spread, 1.0)   # pylint: disable=protected-access
  assert np.mean(spread > everything) == 1.0

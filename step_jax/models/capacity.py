"""Fine capacity ladders: token capacities, as fractions of the full grid, for buckets chosen
on the host between programs (evaluation/dispatch.py) or on device with `scan_blocks`. The
model's default ladder is segmenter.BUCKETS."""


def geometric_buckets(ratio=1.1, smallest=0.1):
  """Capacity fractions smallest, smallest·ratio, ... up to 1: a bucket never holds more
  than `ratio` times the tokens it serves (above the smallest), for ~log(1/smallest)/log(ratio)
  buckets (ratio 1.1: 25). Affordable with `model.scan_blocks` (one block per bucket)."""
  if ratio <= 1 or not 0 < smallest <= 1:
    raise ValueError(f"geometric_buckets(ratio={ratio}, smallest={smallest}): need ratio > 1 "
                     "and 0 < smallest <= 1")
  out, f = [], float(smallest)
  while f < 1:
    out.append(round(f, 6))
    f *= ratio
  return tuple(out) + (1.0,)


def exit_ladder(ratio):
  """Capacity fractions for the segments after the first exit under a host ladder of `ratio`
  (evaluation.dispatch.with_ladder): geometric with ratio² from 10 % of the grid, and below it
  steps of 1/32 of the grid. Halting leaves anything from a few tokens to all of them, and
  later segments run fewer blocks: a floor of 10 % would pad an image that halts almost
  everything to 10 % (measured +3-4 % executed GFLOPs at ViT-B/16), while the steps waste at
  most 1/32 of a full segment; the coarser ratio costs little padding (a small share of the
  compute runs there) and halves these segments' programs."""
  return tuple(i / 32 for i in range(1, 4)) + geometric_buckets(ratio ** 2, 0.1)

"""Layer 3, evaluation: the evaluation protocol (whole/sliding window, mIoU from a confusion
matrix), token and GFLOP statistics on real images, evaluating a workdir's checkpoint."""

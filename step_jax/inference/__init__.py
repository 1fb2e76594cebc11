"""Bulk inference: a folder of images, a glob or a video segmented by a trained model, one
label map written per image (`python -m step_jax.cli.segment`).

  summary = inference.segment_files("workdirs/step", "frames/", "out/",
                                    save=("labels", "overlay"))

`model_dir` is a training workdir (its latest checkpoint) or an export folder: its
`model.jaxexport` when there is one (it takes images up to its fixed input size; larger ones
are refused by name), else its parameters in the model rebuilt from config.json.

Outputs in `output`, each named after the input's path relative to the folder (or to the
glob's fixed prefix) with .png; a video's frames as <video name>/<frame index>.png:
  labels/   the predicted classes as an indexed (mode 'P') PNG at the image's own size, pixel
            value = class id, with the dataset's colours (data.datasets.palette)
  overlay/  the image blended with those colours
  tokens/   the token maps (superpatches; tokens halted by each exit: analysis.visualize)
            over the image as the model saw it (after the protocol's test-time resize)
  summary.json  see `segment_files`

Protocol: the config's evaluation protocol, through the evaluator's functions
(evaluation/evaluator.py): optional test-time resize, the whole image padded to the patch
grid or sliding windows, scores resized back to the image's size, argmax. Images are batched
by padded shape (one program compiled per shape, as evaluation does).

Bucket dispatch (`dispatch`, default the config's eval.dispatch; `bucket_ratio`, its
eval.bucket_ratio; 'auto' picks per model, evaluation/dispatch.py resolve): 'device' runs
the one program per shape; 'host' / 'host_split' choose the capacities on the host as
evaluation does (evaluation/host_scoring.py), and sort the images of one padded shape by
token count in pools of eval.group_batches batches (0: evaluator.POOL_IMAGES images) before
batching them, the capacities planned over the pool; every entry keeps its file name, so
each image's outputs still go to its own files. With several processes each segments its own
files on its own devices, so no capacity needs agreeing between processes.

A rerun continues a killed one: every file is written to a temporary name in its folder and
renamed, and an image whose requested outputs all exist is skipped (outputs are not checked
against the model: use a new `output` for another model). Files that cannot be segmented
(unreadable, corrupt, empty, 16-bit, larger than an exported model's input or than the
device holds) are reported by name in the log and in summary.json and skipped, or raise
decode.BadRecordError with on_error='fatal'.

Devices: batches are split over this process's devices (data parallel). With several
processes (jax.distributed) each segments files[process_index::process_count] (a video:
those frames) into the same `output`, a folder they all see, and process 0 merges their
summaries.
"""
from step_jax.inference.segment import segment_files

__all__ = ["segment_files"]

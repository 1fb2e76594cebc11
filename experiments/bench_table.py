"""Markdown table of `step_jax.cli.benchmark` JSON lines, with ratios against SegViT.

  python experiments/bench_table.py experiments/results/bench_cpu_1024.jsonl [MORE.jsonl ...]

Rows are grouped by (device, variant, image size, dtype, batch); each group's ratios are
against its SegViT row (else its first row), so one file can hold a whole grid
(experiments/bench_gpu.sh). dCTS and STEP rows also show the paper's A100 ratios (ViT-L,
1024², Cityscapes) to compare against.
"""
import json
import sys

# STEP paper, ViT-L/16 at 1024² on an A100: dCTS 2.5x fewer tokens, 2.6x fewer GFLOPs, 3.4x
# throughput; STEP (dCTS + early exit) up to 4x fewer GFLOPs, 1.7x throughput.
PAPER = {"dcts": "2.5× / 2.6× / 3.4×", "step": "– / 4× / 1.7×"}


def name(r):
  """method[,exits] (exit mode) from the row's config string or fields."""
  args = r.get("config", "").split(":", 1)[-1].split(",")
  picked = [a for a in args if a.startswith(("method", "exits"))]
  out = ",".join(picked) or f"method={r.get('method', '?')}"
  return (out + (f" ({r['exit_mode']})" if r.get("exit_mode") else "")
          + (f" [{r['attention_impl']} attention]" if r.get("attention_impl") else ""))


def group_key(r):
  return (r.get("device", ""), r.get("variant", ""), tuple(r.get("image_size") or ()),
          r.get("dtype", ""), r.get("batch", 1))


def table(rows):
  """Markdown lines: one header per group, ratios against the group's SegViT row."""
  groups = {}
  for r in rows:
    groups.setdefault(group_key(r), []).append(r)
  lines = []
  for (device, variant, hw, dtype, batch), rs in groups.items():
    base = next((r for r in rs if r.get("method") == "segvit"), rs[0])
    size = "x".join(map(str, hw)) if hw else "?"
    lines += ["", f"**{variant} {size}, {dtype}, batch {batch}** on {device}", "",
              "| config | tokens per stage | GFLOPs useful / executed | ms/image (min–max) "
              "| images/s | peak MiB | fewer tokens | fewer GFLOPs (useful / executed) "
              "| speed-up | paper: tokens / GFLOPs / throughput |",
              "|" + "---|" * 10]
    for r in rs:
      tokens = [round(t, 1) for t in r["mean_tokens_per_stage"]]
      mem = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else "–"
      lines.append(
          f"| {name(r)} | {tokens} | {r['gflops_useful']:.4g} / {r['gflops_executed']:.4g} | "
          f"{r['ms_per_image_median']:.1f} ({r['ms_per_image_min']:.1f}–"
          f"{r['ms_per_image_max']:.1f}) | {r['images_per_s']:.2f} | {mem} | "
          f"{base['mean_tokens_per_stage'][0] / r['mean_tokens_per_stage'][0]:.2f}× | "
          f"{base['gflops_useful'] / r['gflops_useful']:.2f}× / "
          f"{base['gflops_executed'] / r['gflops_executed']:.2f}× | "
          f"{base['ms_per_image_median'] / r['ms_per_image_median']:.2f}× | "
          f"{PAPER.get(r.get('method'), '–')} |")
  return lines


def main(paths):
  rows = [json.loads(l) for p in paths for l in open(p) if l.strip().startswith("{")]
  if not rows:
    raise SystemExit(f"no benchmark JSON lines in {paths}")
  print("\n".join(table(rows)))


if __name__ == "__main__":
  if len(sys.argv) < 2:
    raise SystemExit(__doc__)
  main(sys.argv[1:])

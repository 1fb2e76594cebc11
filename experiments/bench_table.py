"""Markdown table of benchmark JSON lines, with ratios against the first (baseline) line.

  python experiments/bench_table.py experiments/results/bench_cpu_1024.jsonl
"""
import json
import sys


def main(path):
  rows = [json.loads(l) for l in open(path) if l.strip().startswith("{")]
  base = rows[0]
  print("| config | tokens per stage | GFLOPs useful / executed | ms/image | FLOP ratio "
        "(useful / executed) | wall-clock ratio |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    args = r["config"].split(":", 1)[1].split(",")
    name = ",".join(a for a in args if a.startswith(("method", "exits")))
    mode = f" ({r['exit_mode']})" if r.get("exit_mode") else ""
    print(f"| {name}{mode} | {r['mean_tokens_per_stage']} | "
          f"{r['gflops_useful']:.0f} / {r['gflops_executed']:.0f} | "
          f"{r['ms_per_image_median']:.0f} | "
          f"{base['gflops_useful'] / r['gflops_useful']:.2f}× / "
          f"{base['gflops_executed'] / r['gflops_executed']:.2f}× | "
          f"{base['ms_per_image_median'] / r['ms_per_image_median']:.2f}× |")


if __name__ == "__main__":
  main(sys.argv[1])

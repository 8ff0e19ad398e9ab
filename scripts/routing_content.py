"""Print how a TGH-MoE model's level-1 routers split prompts: by answer format or by topic.

    python scripts/routing_content.py MODEL --data SPEC [--out routing.json]

(docs/results.md, "Level 1: format or content?"; napari_tghmoe.eval.routing_content)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from napari_tghmoe.engine import InferenceEngine
    from napari_tghmoe.eval.routing_content import routing_content_summary
    from napari_tghmoe.datasets import load_dataset_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="dataset spec, e.g. phantom:seeds=100000-100199,region=both")
    parser.add_argument("--phrasing", default="heldout")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    engine = InferenceEngine.from_pretrained(args.model, device="cpu")
    samples = load_dataset_spec(args.data, phrasing=args.phrasing)
    summary = routing_content_summary(engine, samples)
    print(f"level-1 groups {summary['groups']} (averaged over the blocks with task groups), n = {summary['n']}")
    print(f"  format separation (report / closed / open): {summary['format_separation']:.3f}")
    within = {k: round(v, 3) for k, v in summary["topic_separation_within_format"].items()}
    print(f"  topic separation within a format: {summary['topic_separation']:.3f} {within}")
    for cell, value in summary["cells"].items():
        probs = " ".join(f"{g}={p:.2f}" for g, p in value["probs"].items())
        print(f"  {cell:28s} n={value['n']:4d}  {probs}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

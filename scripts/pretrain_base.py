"""Reproduce the embedded base model (adapterhub_lite/base/assets/ahl-tiny-llama) from scratch.

    .venv/bin/python scripts/pretrain_base.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adapterhub_lite.base.embedded import EMBEDDED_BASE_DIR
from adapterhub_lite.base.pretrain import PretrainConfig, pretrain


def main() -> None:
    cfg = PretrainConfig()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=EMBEDDED_BASE_DIR)
    ap.add_argument("--steps", type=int, default=cfg.steps)
    ap.add_argument("--threads", type=int, default=2, help="fixed so runs reproduce bit for bit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg.steps = args.steps
    report = pretrain(args.out, cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()

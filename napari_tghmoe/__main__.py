"""``python -m napari_tghmoe [--screenshot PATH] [--region chest|abdomen] [FILE]``.

Opens napari with a CT (FILE, else the chest phantom) in the reading layout: 3D main view,
linked axial/coronal/sagittal views and the window/level dock. ``--screenshot`` saves the
whole window to PATH and exits 0 (for headless demos; needs an X server such as Xvfb).
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m napari_tghmoe", description=__doc__.split("\n\n")[1])
    parser.add_argument("file", nargs="?", help="CT to open: DICOM folder/file, .nii(.gz), .mha, .mhd, .nrrd")
    parser.add_argument("--screenshot", metavar="PATH", help="save a screenshot of the whole window and quit")
    parser.add_argument("--region", choices=("chest", "abdomen"), default="chest", help="phantom to show without FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from napari_tghmoe._widgets.main_window import launch

    return launch(args.file, screenshot=args.screenshot, region=args.region)


if __name__ == "__main__":
    sys.exit(main())

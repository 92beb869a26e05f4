"""Command-line parsing shared by the algorithm files: `--preset NAME` picks a whole `Args`
of defaults (the toy world, a published recipe), then tyro parses every other flag on top."""

import sys

import tyro


def parse_with_presets(args_class, presets, argv=None, description=None, default="toy"):
    """`args_class` filled from `presets[--preset]` (default `default`) and the remaining flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = default
    if "--preset" in argv:
        i = argv.index("--preset")
        preset = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i:i + 2]
    if preset not in presets:
        raise SystemExit(f"--preset {preset!r}: choose one of {sorted(presets)}")
    return tyro.cli(args_class, default=presets[preset], args=argv, description=description)

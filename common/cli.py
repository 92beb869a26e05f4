"""Command-line parsing shared by the algorithm files: a preset picks a whole `Args` of defaults
(the toy world, a published recipe), then tyro parses every other flag on top. The preset is
`--preset NAME` if given, else the `--model`'s default preset in that file (`--model sd3`: the
file's published SD3.5-M recipe), else the file's default."""

import dataclasses
import sys

import tyro


def _flag_value(argv, flag):
    """The value of `flag` in argv (`--flag V` or `--flag=V`; the last one wins, as in tyro), the
    argv without it, and whether it was there."""
    value, rest, found, i = None, [], False, 0
    while i < len(argv):
        if argv[i] == flag:
            value, found, i = (argv[i + 1] if i + 1 < len(argv) else ""), True, i + 2
            continue
        if argv[i].startswith(flag + "="):
            value, found = argv[i][len(flag) + 1:], True
        else:
            rest.append(argv[i])
        i += 1
    return value, rest, found


def models_help(presets, model_presets):
    """The end of `--help`: which preset and checkpoint each `--model` implies."""
    from common.models import get_adapter_class

    lines = ["", "--model NAME without --preset picks the model's default preset here (an explicit --preset wins; "
             "every flag overrides the preset's fields) and, without --pretrained, the model's checkpoint:"]
    for model, preset in model_presets.items():
        checkpoint = get_adapter_class(model).default_pretrained
        lines.append(f"  --model {model}: --preset {preset}, checkpoint {checkpoint}")
    lines.append(f"\npresets: {', '.join(presets)}. A local copy of a checkpoint: --pretrained /path/to/dir")
    return "\n".join(lines)


def parse_with_presets(args_class, presets, argv=None, description=None, default="toy", model_presets=None):
    """`args_class` filled from a preset and the remaining flags; its `preset` field names the preset.
    `model_presets`: {model name: its default preset in this file}."""
    argv = list(sys.argv[1:] if argv is None else argv)
    model_presets = model_presets or {}
    preset, argv, given = _flag_value(argv, "--preset")
    if not given:
        preset = model_presets.get(_flag_value(argv, "--model")[0], default)
    if preset not in presets:
        raise SystemExit(f"--preset {preset!r}: choose one of {sorted(presets)}")
    if "-h" in argv or "--help" in argv:  # imports every adapter (seconds): only for the help text
        description = (description or "") + models_help(presets, model_presets)
    defaults = dataclasses.replace(presets[preset], preset=preset)
    return tyro.cli(args_class, default=defaults, args=argv, description=description)

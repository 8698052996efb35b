"""``flux-ray import-simpletuner``: a SimpleTuner config.json + multidatabackend.json -> a flux_ray job spec.

``table.py`` holds the one key table; ``convert.py`` reads the files, applies it and writes the report.
"""
from __future__ import annotations

import sys
from pathlib import Path

from flux_ray.simpletuner.convert import ImportResult, import_simpletuner

__all__ = ["ImportResult", "import_cli", "import_simpletuner"]


def import_cli(args) -> int:
    """Spec YAML to ``-o`` (stdout without it), the key-by-key report to stderr."""
    result = import_simpletuner(args.config, args.data_backend_config, args.user_prompt_library, args.working_dir)
    if args.output:
        Path(args.output).write_text(result.to_yaml())
    else:
        sys.stdout.write(result.to_yaml())
        sys.stdout.flush()
    sys.stderr.write(result.report())
    if args.output:
        sys.stderr.write(f"wrote {args.output}\n")
    return 0

"""``python -m gadchat.stages STAGE``: print the stage's ``training/<step_folder>/main.py`` (for
``training/launch.sh``); an unknown stage exits 2 naming the registered ones."""

import sys

from gadchat.stages import STAGES, step_main

if len(sys.argv) != 2 or sys.argv[1] not in STAGES:
    print(f"unknown stage {sys.argv[1:] and sys.argv[1]!r} (stages: {', '.join(STAGES)})", file=sys.stderr)
    sys.exit(2)
print(step_main(sys.argv[1]))

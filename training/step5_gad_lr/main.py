"""GAD-Chat gad_lr stage: see gadchat/stages/gad_lr.py for the step and
`python training/step5_gad_lr/main.py --help` for every flag."""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from gadchat.cli import main_for  # noqa: E402

if __name__ == "__main__":
    main_for("gad_lr")

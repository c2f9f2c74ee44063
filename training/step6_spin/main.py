"""GAD-Chat spin stage: see gadchat/stages/spin.py for the step and
`python training/step6_spin/main.py --help` for every flag."""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from gadchat.cli import main_for  # noqa: E402

if __name__ == "__main__":
    main_for("spin")

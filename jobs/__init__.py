"""The platform's jobs: command-line programs that parse their flags, build the library's
config, run it (on Ray Train or Tune where they train) and report to MLflow.

Run one as a script or as a module, from the repository root of an installed checkout
(`pip install -e .`, which `make setup` does):

    python jobs/train.py --help
    python -m jobs.train --help
"""

"""Promote an adaptor in the MLflow registry, or list a registered model's versions.

python jobs/register.py --run-id RUN --name sst2-ld --alias production   # register a run
python jobs/register.py --name sst2-ld --version 3 --alias production    # move an alias
python jobs/register.py --list sst2-ld
"""

from __future__ import annotations

import json

from jobs.common import base_parser, emit, fail
from jobs.tracking import TRACKING_URI_HELP, check_reachable, register, tracking_uri

#: Run tags a version inherits when a run is registered here (set by jobs/train.py).
LINEAGE_TAGS = ("task", "method", "base_fingerprint", "base_name", "base_version")


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], training=False)
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--list", metavar="NAME", default=None, help="print NAME's versions")
    p.add_argument(
        "--name",
        default=None,
        help="registered model (default with --run-id: the "
        "one the run registered, else <task>-<method>)",
    )
    p.add_argument("--run-id", default=None, help="register this run's adaptor as a new version")
    p.add_argument("--version", default=None, help="an existing version of --name")
    p.add_argument("--alias", default=None, help="alias to point at the version (e.g. production)")
    return p.parse_args(argv)


def list_versions(client, name: str) -> list[dict]:
    aliases = client.get_registered_model(name).aliases  # {alias: version}
    rows = []
    for v in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        held = sorted(a for a, ver in aliases.items() if str(ver) == str(v.version))
        rows.append(
            {"version": int(v.version), "aliases": held, "run_id": v.run_id, "tags": dict(v.tags)}
        )
        print(f"{name} v{v.version} aliases={','.join(held) or '-'} run={v.run_id}")
        for k, val in sorted(v.tags.items()):
            print(f"    {k}: {val}")
    return rows


def register_run(client, run_id: str, name: str | None, alias: str | None) -> dict:
    """A new version from the adaptor model the run logged, tagged from the run."""
    run = client.get_run(run_id)
    model_uri = run.data.tags.get("model_uri")
    if not model_uri:
        fail(f"run {run_id} logged no model (was it a tracked jobs/train.py run?)")
    tags = {k: run.data.tags[k] for k in LINEAGE_TAGS if k in run.data.tags}
    tags.update({k: v for k, v in run.data.metrics.items() if k.startswith("eval_")})
    name = name or run.data.tags.get("registered_model") or f"{tags['task']}-{tags['method']}"
    version = register(model_uri, name, tags, alias)
    return {"name": name, "version": int(version.version), "alias": alias, "run_id": run_id}


def main(argv=None) -> dict:
    a = parse_args(argv)
    uri = tracking_uri(a.tracking_uri)
    check_reachable(uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    try:
        if a.list:
            result = {"name": a.list, "versions": list_versions(client, a.list)}
        elif a.run_id:
            result = register_run(client, a.run_id, a.name, a.alias)
        elif a.name and a.version and a.alias:
            client.set_registered_model_alias(a.name, a.alias, a.version)
            result = {"name": a.name, "version": int(a.version), "alias": a.alias}
        else:
            fail(
                "pass --list NAME, --run-id RUN [--name NAME] [--alias A], "
                "or --name NAME --version V --alias A"
            )
    except MlflowException as e:
        fail(e.message)
    if a.list:  # the versions are printed already; --json adds them as one line
        print(json.dumps(result)) if a.json else None
    else:
        emit(result, a.json)
    return result


if __name__ == "__main__":
    main()

"""Zero-shot composition: merge task adaptors trained apart and measure interference.

    python jobs/compose.py --base runs/base-small/model \\
        --adaptor sst2=runs/sst2/adaptor --adaptor trec=runs/trec/adaptor [--weights 0.5,0.5]

Each task is evaluated with its own adaptor alone and inside the merge (fixed weights, uniform
by default, or a saved router with --router); drop = alone - composed.
"""

from __future__ import annotations

from jobs.common import base_parser, emit, fail


def parser():
    p = base_parser(__doc__.splitlines()[0], training=False, base=True)
    p.add_argument(
        "--adaptor",
        action="append",
        default=[],
        metavar="TASK=DIR",
        required=True,
        help="a task adaptor to merge (repeat for each)",
    )
    p.add_argument("--weights", default=None, help="comma list, one per adaptor (default uniform)")
    p.add_argument("--router", default=None, help="a saved router folder instead of --weights")
    p.add_argument("--tasks", default=None, help="tasks to evaluate (default: every adaptor's)")
    p.add_argument("--eval-limit", type=int, default=200, help="eval examples per task")
    p.add_argument("--output", default=None, help="also write the results to this JSON file")
    return p


Args = parser().args_class  # the flags as a dataclass: run(Args(...)) from Python
parse_args = Args.parse


def run(a: Args) -> dict:
    """Evaluate each adaptor alone and inside the merge (`a`: the job's flags)."""
    import json

    from lora_diffusion.adaptor_io import AdaptorFileError, load_adaptor, load_router
    from lora_diffusion.models import load_base
    from lora_diffusion.multitask import composition_interference, parse_task_dirs

    try:
        dirs = parse_task_dirs(a.adaptor)
        weights = [float(x) for x in a.weights.split(",")] if a.weights else None
    except ValueError as e:
        fail(str(e))
    if len(dirs) < 2:
        fail("composition needs at least two --adaptor TASK=DIR")
    try:
        base, tok = load_base(a.base)
    except (OSError, ValueError) as e:
        fail(str(e))
    try:
        adaptors = {task: load_adaptor(d, base)[0] for task, d in dirs.items()}
        router = None
        if a.router:
            router, order = load_router(a.router, base)
            if order != list(adaptors):
                fail(f"the router's task order {order} differs from the adaptors' {list(adaptors)}")
    except AdaptorFileError as e:
        fail(str(e))
    try:
        result = composition_interference(
            base,
            tok,
            adaptors,
            a.tasks.split(",") if a.tasks else None,
            weights,
            router,
            data_dir=a.data_dir,
            eval_limit=a.eval_limit,
            seed=a.seed,
        )
    except ValueError as e:
        fail(str(e))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(result, f, indent=2)
    return emit(result, a.json)


def main(argv=None) -> dict:
    return run(parse_args(argv))  # first: --help and flag errors answer before torch loads


if __name__ == "__main__":
    main()

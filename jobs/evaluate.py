"""Evaluate a saved task adaptor on a base: generative and scoring accuracy, forgetting.

python jobs/evaluate.py --base runs/base-small/model --adaptor runs/sst2/adaptor --task sst2
"""

from __future__ import annotations

import dataclasses

from jobs.common import add_task_flags, base_parser, emit, fail, from_flags


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], training=False, base=True)
    p.add_argument("--adaptor", default=None, help="adaptor folder; omit to evaluate the base")
    add_task_flags(p)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate only N examples")
    p.add_argument("--eval-steps", type=int, default=None, help="sampling steps (default: T)")
    p.add_argument(
        "--eval-temperature",
        type=float,
        default=1.0,
        help="generative eval: 1 samples the answer (Algorithm 1), 0 decodes greedily",
    )
    p.add_argument("--scoring-num-t", type=int, default=8, help="t values for candidate scoring")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example")
    p.add_argument("--forgetting-blocks", type=int, default=64, help="corpus blocks; 0 skips")
    p.add_argument("--no-base-check", action="store_true", help="skip the base fingerprint check")
    p.add_argument("--plot", default=None, help="write the adaptor's effective-rank plot here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)  # first: --help and flag errors answer before torch is imported
    from lora_diffusion.adaptor_io import AdaptorFileError, adaptor_report, load_adaptor
    from lora_diffusion.composition import AdaptedDenoiser
    from lora_diffusion.corruption import get_process
    from lora_diffusion.finetune import FinetuneConfig, evaluate_all
    from lora_diffusion.methods import load_method, read_method_config
    from lora_diffusion.models import load_base
    from lora_diffusion.schedules import get_schedule

    try:
        base, tok = load_base(a.base)
    except (OSError, ValueError) as e:
        fail(str(e))
    model, adaptor = base, None
    if a.adaptor:
        try:
            method = read_method_config(a.adaptor)["method"]
            if method == "lora_diffusion":
                adaptor, _ = load_adaptor(a.adaptor, base, check_base=not a.no_base_check)
                model = AdaptedDenoiser(base, {a.task: adaptor})
            else:  # a baseline: rebuilt on a copy where it changes the base in place
                model = load_method(a.adaptor, base, check_base=not a.no_base_check)
        except AdaptorFileError as e:
            fail(str(e))
    cfg = from_flags(
        FinetuneConfig,
        a,
        "base task data_dir eval_limit eval_steps eval_temperature scoring_num_t max_length",
        output_dir="",
        forgetting_blocks=a.forgetting_blocks if a.adaptor else 0,
    )
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=a.seed))
    process = get_process(cfg.diffusion.process, len(tok), tok.mask_token_id)
    schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    result = {"task": a.task, "adaptor": a.adaptor}
    if adaptor is not None:
        report = adaptor_report(adaptor, base)
        modules = report.pop("modules")
        result.update(report)
        result["effective_rank_up"] = [round(m["effective_rank_up"], 2) for m in modules]
        result["effective_rank_down"] = [round(m["effective_rank_down"], 2) for m in modules]
        for m in modules:
            print(
                f"  phase {m['phase']} module {m['module']}: rank {m['rank']}, sigma "
                f"{m['sigma']}, effective rank W_A {m['effective_rank_up']:.2f}, "
                f"W_B {m['effective_rank_down']:.2f}"
            )
        if a.plot:
            from lora_diffusion.plots import plot_effective_ranks

            plot_effective_ranks({"modules": modules}, a.plot, f"{a.task} adaptor")
    result.update(evaluate_all(cfg, model, base, tok, process, schedule))
    for ex in result.pop("eval_examples", []):
        print(f"  example: {ex}")
    return emit(result, a.json)


if __name__ == "__main__":
    main()

"""Sample text from a base (or any supported denoiser): prompt in, continuations out.

python jobs/sample.py --model runs/base-small/model --prompt "The city of" --num-samples 3
"""

from __future__ import annotations

from jobs.common import base_parser, emit, fail


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], training=False)
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--gen-length", type=int, default=32, help="tokens to generate")
    p.add_argument("--steps", type=int, default=100, help="diffusion steps T")
    p.add_argument("--process", default=None, help="absorbing | uniform (default: the model's)")
    p.add_argument("--no-cache", action="store_true", help="call the network at every step")
    p.add_argument("--trajectory", action="store_true", help="print the denoising trajectory")
    p.add_argument("--trust-remote-code", action="store_true", help="allow hub model code")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)  # first: --help and flag errors answer before torch is imported
    from lora_diffusion.generation import continuation_batch, generate
    from lora_diffusion.models import load_base

    if a.num_samples < 1 or a.gen_length < 1:
        fail("--num-samples and --gen-length must be >= 1")
    try:
        model, tok = load_base(a.model, trust_remote_code=a.trust_remote_code)
    except (OSError, ValueError) as e:
        fail(str(e))
    prompts = [p for p in a.prompt for _ in range(a.num_samples)]
    batch = continuation_batch(tok, prompts, a.gen_length)
    process = a.process or getattr(model.config, "diffusion_process", "absorbing")
    schedule = getattr(model.config, "noise_schedule", "loglinear")
    out = generate(
        model,
        tok,
        batch,
        process,
        schedule,
        steps=a.steps,
        seed=a.seed,
        cache=not a.no_cache,
        return_trajectory=a.trajectory,
    )
    if out.trajectory:
        for i, step in enumerate(out.trajectory):
            print(f"[step {i + 1}] {step[0]!r}")
    for p, text in zip(prompts, out.texts, strict=True):
        print(f"--- {p!r}\n{p}{text}")
    result = {
        "samples": [{"prompt": p, "text": t} for p, t in zip(prompts, out.texts, strict=True)],
        "network_calls": out.network_calls,
        "calls_saved": out.calls_saved,
    }
    emit({k: v for k, v in result.items() if k != "samples"}, False)
    if a.json:
        import json

        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

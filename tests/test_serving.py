"""The serving engine (library half of the Serve app): batches mixing tasks, weightings, seeds
and step counts give each request what it would get alone."""

import math

import pytest
import torch

from lora_diffusion.composition import AdaptedDenoiser, Router
from lora_diffusion.corruption import get_process
from lora_diffusion.sampling import sample
from lora_diffusion.schedules import get_schedule
from lora_diffusion.serving import ClassifyRequest, GenerateRequest, ServingEngine
from lora_diffusion.tasks import get_task
from tests.test_composition import D, random_adaptor


@pytest.fixture()
def parts(tiny_model, tiny_tokenizer):
    return tiny_model, tiny_tokenizer, random_adaptor(1), random_adaptor(2)


def engine_of(base, tok, adaptors, router=None, router_tasks=None):
    return ServingEngine(AdaptedDenoiser(base, adaptors, router, router_tasks), tok, max_length=64)


def test_per_row_generators_make_a_row_independent_of_its_batch(tiny_model):
    proc, sched = get_process("absorbing", 512, tiny_model.mask_token_id), get_schedule("loglinear")
    ids = torch.randint(6, 512, (3, 10), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, 6:] = True
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    together = sample(tiny_model, proc, sched, ids, attn, target, 4, gens([5, 6, 7])).tokens
    for i, seed in enumerate([5, 6, 7]):
        alone = sample(
            tiny_model,
            proc,
            sched,
            ids[i : i + 1],
            attn[i : i + 1],
            target[i : i + 1],
            4,
            gens([seed]),
        ).tokens
        assert torch.equal(together[i], alone[0])
    assert not torch.equal(together[0, 6:], together[1, 6:])  # the seeds do differ
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample(tiny_model, proc, sched, ids, attn, target, 4, gens([1, 2]))


def test_one_hot_request_reproduces_the_single_task_engine(parts):
    base, tok, a, b = parts
    both, alone = engine_of(base, tok, {"a": a, "b": b}), engine_of(base, tok, {"a": a})
    prompt = both.task_prompt("sst2", "a gripping and moving film")
    req = lambda w: GenerateRequest(prompt, 4, w, steps=4, seed=3, num_samples=2)
    composed = both.generate([req([1.0, 0.0])])[0]
    single = alone.generate([req(None)])[0]
    assert composed["texts"] == single["texts"]
    assert composed["weights"] == {"a": 1.0, "b": 0.0}
    other = both.generate([req([0.0, 1.0])])[0]  # the adaptors perturb differently
    assert both.generate([req([1.0, 0.0])])[0]["texts"] == composed["texts"]  # deterministic
    assert other["weights"] == {"a": 0.0, "b": 1.0}


def test_a_mixed_batch_gives_each_request_its_answer_alone(parts):
    base, tok, a, b = parts
    router = Router(D, 2)
    engine = engine_of(base, tok, {"a": a, "b": b}, router)
    reqs = [
        GenerateRequest(engine.task_prompt("sst2", "dull"), 3, [1.0, 0.0], steps=3, seed=1),
        GenerateRequest(engine.task_prompt("trec", "who wrote it ?"), 5, [0.3, 0.7], 5, 2, 2),
        GenerateRequest("the history of the city", 6, None, steps=3, seed=4),
        ClassifyRequest("sst2", "a lovely film", [0.0, 1.0], seed=0),
        ClassifyRequest("trec", "where is paris ?", None, seed=1),
        ClassifyRequest("sst2", "boring and long", [1.0, 0.0], seed=2),
    ]
    together = engine.run(reqs)
    assert all(r["timing"]["batch_size"] == 6 for r in together)
    for req, got in zip(reqs, together, strict=True):
        alone = engine.run([req])[0]
        if isinstance(req, GenerateRequest):
            assert got["texts"] == alone["texts"] and len(got["texts"]) == req.num_samples
        else:
            assert got["label"] == alone["label"]
            for label, score in got["scores"].items():
                assert math.isclose(score, alone["scores"][label], rel_tol=1e-4, abs_tol=1e-4)
            assert math.isclose(sum(got["probabilities"].values()), 1.0, abs_tol=1e-4)
        for task, w in got["weights"].items():
            assert math.isclose(w, alone["weights"][task], abs_tol=1e-4)
    routed = together[2]["weights"]  # the router's softmax, averaged over the steps
    assert math.isclose(sum(routed.values()), 1.0, abs_tol=1e-5) and min(routed.values()) > 0
    assert together[3]["weights"] == {"a": 0.0, "b": 1.0}


def test_a_router_over_some_tasks_gives_the_others_no_weight(parts):
    base, tok, a, b = parts
    engine = engine_of(base, tok, {"a": a, "b": b}, Router(D, 1), router_tasks=["b"])
    out = engine.generate([GenerateRequest("a town in the north", 4, None, 2)])[0]
    assert out["weights"] == {"a": 0.0, "b": 1.0}
    with pytest.raises(ValueError, match=r"routes to \['c'\]"):
        AdaptedDenoiser(base, {"a": a, "b": b}, Router(D, 1), ["c"])
    with pytest.raises(ValueError, match="1 outputs for 2 tasks"):
        AdaptedDenoiser(base, {"a": a, "b": b}, Router(D, 1))


def test_weight_vectors_are_checked_and_normalised(parts):
    base, tok, a, b = parts
    engine = engine_of(base, tok, {"a": a, "b": b})
    assert engine.weight_vector({"a": 2, "b": 6}) == [0.25, 0.75]
    assert engine.weight_vector({"b": 1}) == [0.0, 1.0]
    assert engine.weight_vector(None) is None
    for bad, msg in [
        ({"c": 1}, "unknown adaptor"),
        ({"a": -1, "b": 2}, ">= 0"),
        ({"a": 0}, "positive"),
        ({"a": float("nan")}, "finite"),
        ({"a": 1e308, "b": 1e308}, "finite"),  # each finite, the sum not: was all zeros
    ]:
        with pytest.raises(ValueError, match=msg):
            engine.weight_vector(bad)
    with pytest.raises(ValueError, match="no router"):  # None needs a router with 2 adaptors
        engine.generate([GenerateRequest("text", 2, None, 2)])


def test_cost_counts_sequences_calls_and_tokens(parts):
    base, tok, a, b = parts
    engine = engine_of(base, tok, {"a": a, "b": b})
    prompt = engine.task_prompt("sst2", "a gripping and moving film")
    one = engine.cost(GenerateRequest(prompt, 4, None, steps=4))
    assert engine.cost(GenerateRequest(prompt, 4, None, steps=8, num_samples=3)) == 6 * one
    assert engine.cost(GenerateRequest(prompt, 8, None, steps=4)) == one + 4 * 4  # 4 tokens more
    # candidate scoring: label words x num_t noise levels x tokens
    labels = len(get_task("trec").label_words)
    trec = engine.cost(ClassifyRequest("trec", "who is it ?", None))
    assert trec % (labels * engine.num_t) == 0 and trec > labels * engine.num_t


def test_a_forked_engine_answers_the_same_from_another_thread_at_once(parts):
    # the Serve app's two lanes run one engine each at the same time; the composed model keeps
    # its call's weights on itself, so the lanes must not share it
    from concurrent.futures import ThreadPoolExecutor

    base, tok, a, b = parts
    engine = engine_of(base, tok, {"a": a, "b": b}, Router(D, 2))
    twin = engine.fork()
    assert twin.model is not engine.model and twin.model.base is engine.model.base
    reqs = [
        GenerateRequest(engine.task_prompt("sst2", f"film {i}"), 4, w, 4, i)
        for i, w in enumerate([[1.0, 0.0], [0.0, 1.0], None, [0.5, 0.5]])
    ]
    alone = [engine.generate([r])[0] for r in reqs]
    run_all = lambda e: [e.generate([r])[0] for _ in range(3) for r in reqs]
    with ThreadPoolExecutor(2) as pool:  # one thread per engine, both at once
        for got in pool.map(run_all, [engine, twin]):
            assert got == alone * 3

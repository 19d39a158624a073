"""The GPU check's driver, end to end on the CPU at its --tiny sizes (what a GPU machine runs,
shrunk): every step runs and writes its results where the device tool brings them back."""

import json

from benchmarks import gpu_check
from lora_diffusion.methods import METHODS


def test_the_gpu_check_driver_runs_every_step_and_writes_its_results(
    tiny_base_dir, data_dir, tmp_path
):
    out = tmp_path / "out"
    status = gpu_check.main(["--out", str(out), "--base", str(tiny_base_dir), "--data-dir",
                             str(data_dir), "--device", "cpu", "--tiny", "--work",
                             str(tmp_path / "work")])  # fmt: skip
    report = json.loads((out / "gpu_check.json").read_text())
    failed = {k: s.get("error") for k, s in report["steps"].items() if s["status"] != "ok"}
    assert status == 0 and not failed
    assert list(report["steps"]) == ["smoke", "step_cost", "pretrain", "finetune"]
    rows = report["steps"]["step_cost"]["result"]["rows"]
    assert {r["method"] for r in rows} == {"lora_diffusion", "full", "weight_lora"}
    assert [r["x_full"] for r in rows if r["method"] == "full"] == [1.0]
    assert report["steps"]["pretrain"]["result"]["tokens_per_s"] > 0
    assert set(report["steps"]["finetune"]["result"]) == set(METHODS)
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check.json",
        "step_cost.json",
        "summary.md",
    ]
    assert "| lora_diffusion |" in (out / "summary.md").read_text()

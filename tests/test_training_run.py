"""End-to-end runs on a tiny model: the API run, eval/sweep/plot CLIs, resume after a kill,
and 2-process DDP and FSDP (gloo) against one process with the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prosparse.training import load_recipe, train
from prosparse.training.checkpoint import latest_checkpoint
from prosparse.training.cli import main
from training_tiny import make_corpus, make_tiny_model_dir, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    return tmp, make_tiny_model_dir(tmp / "model"), make_corpus(tmp / "corpus")


def cli(*args, timeout=120, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "prosparse.training.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def finished(proc, timeout=180):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def params(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)


def test_api_run_with_distillation_then_eval_sweep_plot(tiny, capsys):
    tmp, model_dir, corpus = tiny
    recipe = tiny_recipe(tmp, model_dir, corpus, distill={"weight": 0.5},
                         model={"path": str(model_dir), "gradient_checkpointing": True, "freeze_embeddings": True},
                         run={"out_dir": str(tmp / "api-run"), "export_at": [2]},
                         sparsity={"threshold": 0.01, "l1": "contribution"})
    run_dir = train(load_recipe(str(write_recipe(tmp / "api.json", recipe))))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[0]["lambda"] == 0 and rows[2]["lambda"] == 0.001 and rows[-1]["lambda"] == 0.01
    assert all(r["kl"] > 0 and 0 < r["sparsity"] < 1 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [4, 8] and len(evals[0]["layer_sparsity"]) == 2
    assert (run_dir / "metrics.csv").read_text().startswith("step,loss,")
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["hidden_act"] == "relu" and config["hidden_act_param"] == 0.01
    assert (run_dir / "export-step-2" / "model.safetensors").is_file()
    from safetensors.torch import load_file
    base, trained = load_file(model_dir / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    assert torch.equal(base["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert [r["threshold"] for r in final] == [0.0, 0.01]
    assert final[1]["sparsity"] >= final[0]["sparsity"]

    recipe_file = str(tmp / "api.json")
    assert main(["eval", str(run_dir), "--recipe", recipe_file, "--json", str(tmp / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "L01" in out
    assert json.loads((tmp / "e.json").read_text())["threshold"] == 0.01
    assert main(["eval", str(model_dir), "--recipe", recipe_file, "--activation", "relu"]) == 0
    assert "[relu]" in capsys.readouterr().out
    assert main(["sweep-threshold", str(latest_checkpoint(run_dir)), "--recipe", recipe_file,
                 "--thresholds", "0,0.05"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # "step …", header, 2 rows
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "training.png").stat().st_size > 10_000


def test_resume_after_kill_matches_an_uninterrupted_run(tiny):
    tmp, model_dir, corpus = tiny
    recipe = tiny_recipe(tmp, model_dir, corpus, train={"steps": 3000},
                         sparsity={"relu_steps": 2, "stages": [[0.001, 5], [0.01, 12], [0.02, 3000]]},
                         distill={"weight": 0.3}, run={"eval_every": 10_000, "save_every": 3})
    recipe_file = str(write_recipe(tmp / "resume.json", recipe))
    killed_dir, whole_dir = tmp / "killed", tmp / "whole"

    proc = cli("train", "--recipe", recipe_file, "-o", f"run.out_dir={killed_dir}")
    deadline = time.time() + 120
    while latest_checkpoint(killed_dir) is None or latest_checkpoint(killed_dir).name < "step_00000006.pt":
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    resumed_from = params(latest_checkpoint(killed_dir))["step"]
    with open(killed_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 99999, "lo')  # as if the kill had landed mid-write
    stop = resumed_from + 7

    out = finished(cli("train", "--recipe", recipe_file, "--resume", "-o", f"run.out_dir={killed_dir}",
                       "-o", f"train.stop_at_step={stop}"))
    assert "resumed from" in out and f"at step {resumed_from}" in out
    finished(cli("train", "--recipe", recipe_file, "-o", f"run.out_dir={whole_dir}",
                 "-o", f"train.stop_at_step={stop}"))

    a, b = params(latest_checkpoint(killed_dir)), params(latest_checkpoint(whole_dir))
    assert a["step"] == b["step"] == stop
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for pid, state in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][pid]["exp_avg_sq"], state["exp_avg_sq"])
    rows = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows(killed_dir)] == list(range(1, stop + 1))
    assert [r["loss"] for r in rows(killed_dir)] == [r["loss"] for r in rows(whole_dir)]


@pytest.fixture(scope="module")
def distributed_recipe(tiny):
    """A 4-step recipe, and its single-process run with grad_accum 2 (the same global batch)."""
    tmp, model_dir, corpus = tiny
    recipe = tiny_recipe(tmp, model_dir, corpus, train={"steps": 4, "micro_batch": 2, "grad_accum": 1},
                         sparsity={"relu_steps": 1, "stages": [[0.01, 4]]},
                         run={"eval_every": 2, "save_every": 4})
    recipe_file = str(write_recipe(tmp / "distributed.json", recipe))
    single = finished(cli("train", "--recipe", recipe_file, "-o", f"run.out_dir={tmp / 'single'}",
                          "-o", "train.grad_accum=2"))
    assert "1 process(es)" in single
    return recipe_file, params(latest_checkpoint(tmp / "single"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tiny, distributed_recipe, mode):
    tmp = tiny[0]
    recipe_file, single = distributed_recipe
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "prosparse.training.cli", "train", "--recipe", recipe_file,
                          "-o", f"run.out_dir={tmp / mode}", "-o", f"train.distributed={mode}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 process(es)" in run.stdout
    two = params(latest_checkpoint(tmp / mode))
    assert two["world_size"] == 2 and single["world_size"] == 1
    for name in single["model"]:
        assert torch.allclose(two["model"][name], single["model"][name], atol=1e-5, rtol=1e-4), name
    assert (tmp / mode / "final" / "model.safetensors").is_file()

"""``prosparse-train plot``: λ(t) and LR, losses, and sparsity against steps, to one PNG."""

from __future__ import annotations

import json
from pathlib import Path

from .metrics import read_jsonl
from .schedule import lambda_at, lr_at


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    steps = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    if not steps:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'}: no metrics to plot")
    x = [r["step"] for r in steps]
    fig, (ax_lam, ax_loss, ax_sp) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)

    recipe_file = run_dir / "recipe.json"
    if recipe_file.is_file():  # the whole planned schedule, also beyond the steps run so far
        recipe = json.loads(recipe_file.read_text())
        sparsity, train = recipe["sparsity"], recipe["train"]
        planned = range(1, train["steps"] + 1)
        ax_lam.plot(planned, [lambda_at(t, sparsity["stages"], sparsity["relu_steps"]) for t in planned],
                    color="tab:red", linestyle=":", alpha=0.6, label="λ(t) planned")
        planned_lr = [lr_at(t, train["lr"], train["steps"], train["warmup_steps"], train["lr_decay"],
                            train["min_lr_ratio"]) for t in planned]
    ax_lam.plot(x, [r["lambda"] for r in steps], color="tab:red", label="λ(t)")
    ax_lam.set_ylabel("λ")
    ax_lr = ax_lam.twinx()
    if recipe_file.is_file():
        ax_lr.plot(planned, planned_lr, color="tab:gray", linestyle=":", alpha=0.6)
    ax_lr.plot(x, [r["lr"] for r in steps], color="tab:gray", linestyle="--", label="learning rate")
    ax_lr.set_ylabel("learning rate")
    ax_lam.legend(loc="upper left")
    ax_lr.legend(loc="upper right")
    ax_lam.set_title(f"{run_dir.name}: schedule")

    ax_loss.plot(x, [r["loss"] for r in steps], label="total loss", alpha=0.8)
    ax_loss.plot(x, [r["ce"] for r in steps], label="cross-entropy", alpha=0.8)
    if any(r["kl"] for r in steps):
        ax_loss.plot(x, [r["kl"] for r in steps], label="KL to teacher", alpha=0.8)
    ax_loss.plot(x, [r["lambda_l1"] for r in steps], label="λ·L1", alpha=0.8)
    if evals:
        import math
        ax_loss.plot([e["step"] for e in evals], [e["nll"] for e in evals], "o-", color="black",
                     label="held-out NLL")
        for e in evals[-1:]:
            ax_loss.annotate(f"ppl {math.exp(e['nll']):.1f}", (e["step"], e["nll"]), textcoords="offset points",
                             xytext=(-40, 8))
    ax_loss.set_ylabel("loss (nats)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    ax_sp.plot(x, [100 * r["sparsity"] for r in steps], label="training batch", alpha=0.7)
    if evals:
        ax_sp.plot([e["step"] for e in evals], [100 * e["sparsity"] for e in evals], "o-", color="black",
                   label="held-out")
    ax_sp.set_ylabel("activation sparsity (%)")
    ax_sp.set_xlabel("step")
    ax_sp.legend()
    ax_sp.grid(alpha=0.3)

    fig.tight_layout()
    out = Path(out) if out else run_dir / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

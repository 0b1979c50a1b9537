"""The ProSparse training loop: ReLU substitution, λ(t)·L1(x1), optional distillation.

Reads top to bottom: set up (process group, model, teacher, data, optimizer, resume) → for each
step: λ and LR from the step → micro-batches (forward under the x1 probe, loss, backward) →
clip, step → log → evaluate / checkpoint / export when due → final export and report.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from . import distributed as dist
from .checkpoint import TrainingError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .data import SequenceStream, build_token_cache, micro_batch_start
from .evaluate import (autocast_context, evaluate, layer_table, next_token_nll, summary_line,
                       sweep_threshold, use_bf16)
from .metrics import MetricsLog
from .model_io import export_hf, fresh_copy, load_model
from .recipe import Recipe
from .schedule import lambda_at, lr_at
from .surgery import X1Probe, set_gate_activation


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions, mean over tokens, × T²."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean")
    return kl * t * t


def select_trainable(model, recipe: Recipe) -> list[torch.nn.Parameter]:
    """Freeze what the recipe keeps fixed; return the parameters that train."""
    for name, p in model.named_parameters():
        train = recipe.model.trainable == "all" or any(k in name for k in ("gate_proj", "up_proj", "down_proj"))
        if recipe.model.freeze_embeddings and ("embed_tokens" in name or "lm_head" in name):
            train = False
        p.requires_grad_(train)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe) -> torch.optim.AdamW:
    t = recipe.train
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=tuple(t.betas))


def recipe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old → new`` for every value that differs between two recipe dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += recipe_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a} → {b}")
    return changes


def log_main(*args) -> None:
    if dist.is_main():
        print(*args, flush=True)


def train(recipe: Recipe, resume: bool = False) -> Path:
    """Run (or resume) the recipe; return the run folder."""
    device = dist.init()
    try:
        run_dir = _train(recipe, resume, device)
        # a finished run's ranks leave the group together (a rank tearing down while another
        # still talks to it is what gloo handles worst); not on an error, where the others may
        # never get here
        dist.barrier()
        return run_dir
    finally:
        dist.shutdown()


def _train(recipe: Recipe, resume: bool, device: torch.device) -> Path:
    t, s = recipe.train, recipe.sparsity
    run_dir = recipe.out_dir
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed + dist.rank())
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if not resume and list_checkpoints(run_dir):
        raise TrainingError(f"run folder {run_dir} already has checkpoints: pass --resume to continue it, "
                           f"or choose another run.out_dir")
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    dist.barrier()

    # --- model, teacher, data ---
    model, tokenizer = load_model(recipe.model.path)
    teacher = None
    if recipe.distill.weight > 0:  # the model as loaded (SiLU), before surgery
        teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    set_gate_activation(model, recipe.model.activation)
    trainable = select_trainable(model, recipe)
    if recipe.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    probe = X1Probe(model, s.l1)

    data = recipe.data
    if dist.is_main():
        build_token_cache(data.sources, tokenizer, data.cache_dir, data.extensions, data.heldout_fraction,
                          data.seed, data.jsonl_field, log=log_main)
    dist.barrier()
    cache = build_token_cache(data.sources, tokenizer, data.cache_dir, data.extensions, data.heldout_fraction,
                              data.seed, data.jsonl_field)
    stream = SequenceStream(cache.sequences("train", data.seq_len), seed=data.seed)
    heldout = cache.sequences("heldout", data.seq_len)
    if recipe.run.eval_sequences:
        heldout = heldout[: recipe.run.eval_sequences]
    world = dist.world_size()
    global_batch = t.micro_batch * t.grad_accum * world
    tokens_per_step = global_batch * data.seq_len
    log_main(f"run {recipe.name}: {t.steps} steps × {global_batch} sequences × {data.seq_len} tokens = "
             f"{t.steps * tokens_per_step:,} tokens, {t.steps * global_batch / len(stream):.2f} epochs over "
             f"{len(stream):,} training sequences; held-out {len(heldout)} sequences; "
             f"{sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,} "
             f"parameters train; bf16 autocast {'on' if use_bf16(device, t.precision) else 'off'}; "
             f"{world} process(es)")

    # --- optimizer, distribution, resume ---
    model = dist.wrap(model, t.distributed, device)
    # after wrapping: FSDP replaces the parameters by sharded ones
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], recipe)
    start_step = 0
    log = MetricsLog(run_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        start_step = state["step"]
        if state["global_batch"] != global_batch or state["seq_len"] != data.seq_len:
            raise TrainingError(f"{checkpoint}: written with global batch {state['global_batch']} × "
                               f"{state['seq_len']} tokens; this run has {global_batch} × {data.seq_len}")
        log_main(f"resumed from {checkpoint} at step {start_step}")
        changed = recipe_changes(state["recipe"], recipe.to_dict())
        if changed:
            log_main("recipe changed since the checkpoint: " + "; ".join(changed))
    elif resume:
        log_main(f"--resume: no checkpoint in {run_dir}; starting from step 0")
    if dist.is_main():
        log.truncate(start_step)
    last_step = t.stop_at_step if 0 < t.stop_at_step < t.steps else t.steps
    eval_model = dist.unwrap(model)

    def evaluate_and_log(step: int) -> None:
        result = evaluate(eval_model, heldout, recipe.run.eval_batch, t.precision, device=device)
        if dist.is_main():
            log.eval({"step": step, **result.to_dict()})
            progress.write(summary_line(result, f"step {step} held-out") + "\n" + layer_table(result))

    from tqdm import tqdm
    progress = tqdm(total=last_step, initial=start_step, disable=not (recipe.run.progress_bar and dist.is_main()),
                    dynamic_ncols=True, mininterval=2.0, desc=recipe.name)

    # --- the loop ---
    for step in range(start_step + 1, last_step + 1):
        started = time.perf_counter()
        lam = lambda_at(step, s.stages, s.relu_steps)
        lr = lr_at(step, t.lr, t.steps, t.warmup_steps, t.lr_decay, t.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(4, dtype=torch.float64)  # loss, ce, kl, l1 (summed over micro-steps)
        probe.reset_counts()
        for micro in range(t.grad_accum):
            start = micro_batch_start(step, micro, dist.rank(), t.micro_batch, t.grad_accum, world)
            input_ids = torch.as_tensor(stream.take(start, t.micro_batch), device=device)
            sync = micro == t.grad_accum - 1 or not hasattr(model, "no_sync")
            with model.no_sync() if not sync else contextlib.nullcontext():
                with autocast_context(device, t.precision), probe.capture(want_l1=True):
                    logits = model(input_ids=input_ids, use_cache=False).logits
                ce = next_token_nll(logits, input_ids)
                kl = torch.zeros((), device=device)
                if teacher is not None:
                    with torch.no_grad(), autocast_context(device, t.precision):
                        teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
                    kl = distill_kl(logits[:, :-1], teacher_logits[:, :-1], recipe.distill.temperature)
                lm_loss = (1 - recipe.distill.weight) * ce + recipe.distill.weight * kl
                l1 = probe.l1()
                loss = lm_loss + lam * l1
                (loss / t.grad_accum).backward()
            sums += torch.tensor([loss.item(), ce.item(), kl.item(), l1.item()], dtype=torch.float64)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   t.grad_clip if t.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # --- metrics of the step, over all ranks ---
        zeros, entries = probe.counts()
        reduced = torch.cat([sums, zeros.cpu(), entries.cpu()]).to(device)
        dist.all_reduce_sum(reduced)
        reduced = reduced.cpu()
        loss_sum, ce_sum, kl_sum, l1_sum = (reduced[:4] / (t.grad_accum * world)).tolist()
        n_layers = probe.n_layers
        layer = reduced[4:4 + n_layers] / reduced[4 + n_layers:].clamp(min=1)
        step_s = time.perf_counter() - started
        row = {"step": step, "loss": loss_sum, "lm_loss": (1 - recipe.distill.weight) * ce_sum
               + recipe.distill.weight * kl_sum, "ce": ce_sum, "kl": kl_sum, "l1": l1_sum,
               "lambda": lam, "lambda_l1": lam * l1_sum, "lr": lr, "sparsity": layer.mean().item(),
               "grad_norm": float(grad_norm), "tokens": step * tokens_per_step,
               "tokens_per_s": tokens_per_step / step_s, "step_s": step_s,
               "epoch": step * global_batch / len(stream)}
        if dist.is_main():
            log.step(row)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_sum:.3f}", ce=f"{ce_sum:.3f}", l1=f"{l1_sum:.3g}",
                                 lam=f"{lam:.3g}", sp=f"{row['sparsity']:.1%}", tok_s=f"{row['tokens_per_s']:.0f}")

        # --- evaluation, checkpoints, exports ---
        if step % recipe.run.eval_every == 0 or step == t.steps:
            evaluate_and_log(step)
        if step in recipe.run.export_at:  # before the checkpoint: a kill between them repeats it
            export(model, tokenizer, run_dir / f"export-step-{step}", recipe, step, final=False)
        if step % recipe.run.save_every == 0 or step == last_step:
            save_checkpoint(run_dir, step, model, optimizer, recipe.to_dict(),
                            {"global_batch": global_batch, "seq_len": data.seq_len,
                             "data_position": step * global_batch}, keep=recipe.run.keep_checkpoints)
    progress.close()

    if last_step == t.steps:
        final_report(eval_model, heldout, recipe, device, run_dir)
        export(model, tokenizer, run_dir / "final", recipe, last_step, final=True)
    return run_dir


def export(model, tokenizer, out_dir: Path, recipe: Recipe, step: int, final: bool) -> None:
    """HF checkpoint of the current weights (collective: the full state dict is gathered)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_main():
        plain = fresh_copy(dist.unwrap(model), state)
        if recipe.model.activation == "silu":
            activation, threshold = "silu", 0.0
        elif final and recipe.sparsity.threshold > 0:
            activation, threshold = "fatrelu", recipe.sparsity.threshold
        else:
            activation, threshold = "relu", 0.0
        export_hf(plain, tokenizer, out_dir, activation, threshold,
                  info={"recipe": recipe.to_dict(), "step": step})
        log_main(f"exported {activation}{f'({threshold:g})' if threshold else ''} model of step {step} → {out_dir}")
    dist.barrier()


def final_report(model, heldout: np.ndarray, recipe: Recipe, device, run_dir: Path) -> None:
    """Held-out perplexity and sparsity of the trained model for every sweep threshold."""
    if recipe.model.activation == "silu":
        results = [evaluate(model, heldout, recipe.run.eval_batch, recipe.train.precision, device=device)]
    else:
        results = sweep_threshold(model, heldout, recipe.sparsity.sweep_thresholds, recipe.run.eval_batch,
                                  recipe.train.precision)
    if dist.is_main():
        (run_dir / "final_eval.json").write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")
        for r in results:
            log_main(summary_line(r, "final held-out"))

"""`memcli train`: memorise a corpus into a LoRA adapter with SFT, MemFT-OT or MemFT-SW.

The loop is one readable page (`Trainer.loop`); everything it needs is set up in `Trainer.__init__`, and bad
input is refused there, before the run folder exists.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from memcli import __version__
from memcli.core import corpus, models, runs
from memcli.core.errors import UserError
from memcli.gguf.adapter import export_adapter, exportable
from memcli.training import forward, lora
from memcli.training.config import (
    TrainConfig,
    complete_settings,
    describe_differences,
    lr_factor,
    setting_differences,
)
from memcli.training.deploy_aware import Deployment
from memcli.training.locality import base_side_path, reference_windows, torch_locality
from memcli.training.objectives import (
    Curriculum,
    SlidingConfig,
    SlidingState,
    hard_tokens,
    ot_loss,
    sft_weights,
    sliding_loss,
    weighted_mean,
)
from memcli.training.preserve import Preserve, replay_windows


def versions() -> dict:
    import peft
    import transformers

    return {"memcli": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "transformers": transformers.__version__, "peft": peft.__version__}


class NonFiniteLoss(Exception):
    pass


# --gate-checks: the share of tokens past p = 0.5 in the entries' latest training passes lags the clean pass's (the
# passes are up to an epoch old, and taken before the update that trains those tokens): 0.05-0.15 on the 20-entry
# PhoneBooks. Checks resume this far below --tail-from, so the tail starts when the clean pass says, as ungated.
GATE_SLACK = 0.2


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, resume: bool = False, force: bool = False, log=print):
        self.cfg, self.out, self.log = cfg, Path(out), log
        # First: one process at a time in a run folder, held until `run` ends (or `close`).
        self.lock = runs.RunLock(self.out)
        try:
            self.setup(cfg, resume, force)
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        """Let go of the run folder (`run` does when it ends)."""
        self.lock.release()

    def setup(self, cfg: TrainConfig, resume: bool, force: bool) -> None:
        if self.out.exists() and not (resume or force):
            raise UserError(f"run folder {self.out} exists: use --resume to continue it or --force to replace it")
        if resume and not runs.is_run(self.out):
            raise UserError(f"--resume: {self.out} is not a run folder (no config.yaml)")
        if resume:
            saved = self.saved_settings()
            differs = setting_differences(saved, cfg)
            if differs:
                raise UserError(f"--resume: setting(s) differ from {self.out}/config.yaml (saved -> now): "
                                f"{describe_differences(differs)}")

        # format errors first, before any model loads
        entries = corpus.read_corpus(cfg.corpus, cfg.key, allow_conflicting_keys=cfg.allow_conflicting_keys)
        self.device = models.pick_device(cfg.device)
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if self.device.startswith("cuda") else "float32")
        self.spec = models.resolve(cfg.model)
        self.sampler = cfg.decoding()  # --sampler: trained for and certified under, besides plain greedy
        self.deploy = None  # --deploy: memcli.training.deploy_aware
        if cfg.deploy is not None:  # the bases as llama.cpp's quantiser makes them at those types
            self.deploy = Deployment(self.spec, cfg.deploy_types(), self.log, sampler=self.sampler)
            model, self.tokenizer = self.deploy.load_base(dtype, self.device), models.load_tokenizer(self.spec)
        else:
            model, self.tokenizer = models.load_model(self.spec, dtype, self.device)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        n_ctx = getattr(model.config, "max_position_embeddings", None)
        self.examples = corpus.prepare(entries, self.tokenizer, chat_template=cfg.chat_template, eos=cfg.eos,
                                       system_prompt=cfg.system_prompt,
                                       answer_tokens=cfg.answer_tokens, n_ctx=n_ctx, path=cfg.corpus)
        self.layers, self.modules = lora.resolve_placement(model, cfg.layers, cfg.modules)
        self.model = lora.add_lora(model, cfg.rank, cfg.alpha, cfg.dropout, self.layers, self.modules, cfg.seed,
                                   rslora=cfg.rslora, init=cfg.init)
        self.params = lora.trainable_parameters(self.model)
        self.l = corpus.answer_tokens(self.examples)
        self.gguf_blocker = self.check_gguf()  # before step 1: can adapter.gguf be written at the end?
        if self.deploy is not None:
            self.deploy.attach(self.model, self.gguf_blocker or ("not with --gguf off" if cfg.gguf == "off" else None))
        self.replay = self.replay_text()  # --preserve's replay windows (a bad --preserve-text is refused here)
        self.preserve = None  # the preserve term, built when the run starts (memcli.training.preserve.Preserve)
        self.prefix = None  # the frozen layers' output, built when the run starts (forward.FrozenPrefix)

        self.sw_form = None
        if cfg.method == "memft-sw":
            auto = "spatial" if len(self.examples) == 1 else "temporal"
            self.sw_form = cfg.sw_form if cfg.sw_form != "auto" else auto
        self.curriculum = (Curriculum(len(self.examples), cfg.seed, tuple(cfg.curriculum_epochs))
                           if self.sw_form == "temporal" else None)
        self.sliding = [SlidingState() for _ in self.examples]
        self.total_steps = cfg.max_steps or sum(math.ceil(len(self.epoch_order(e)) / cfg.batch_size)
                                                for e in range(cfg.epochs))
        self.optimizer = torch.optim.AdamW(lora.parameter_groups(self.model, cfg.lr, cfg.lora_plus), lr=cfg.lr,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        self.tail = False  # the last clean check found the run in its tail (--tail-threshold, --tail-lr apply)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s, self.total_steps) * (cfg.tail_lr if self.tail else 1.0))

        # Inputs are good: from here on the run folder exists.
        if force and self.out.exists() and not resume:
            runs.remove_run(self.out)
        created = not self.out.exists()
        self.step, self.wall, self.l_init, self.resumed = 0, 0.0, None, resume
        self.latest = forward.LatestPass(len(self.examples))  # what each entry's latest training pass saw
        # --gate-checks: only without dropout is a training pass the clean pass of its step
        self.gated = cfg.gate_checks and cfg.dropout == 0
        try:
            runs.create_run(self.out)
            if not resume:
                self.write_config()
        except OSError as e:
            if created:
                runs.remove_run(self.out)
            raise UserError(f"--out {self.out}: cannot create the run folder ({e.strerror or e})") from None
        if resume:
            self.load_checkpoint()

    def saved_settings(self) -> dict:
        """The settings RUN/config.yaml recorded (a setting newer than the run: what that run did)."""
        try:
            settings = runs.read_settings(self.out)
        except UserError as e:
            raise UserError(f"--resume: {e}; use --force to start the run over") from None
        return complete_settings(settings)

    def check_gguf(self) -> str | None:
        """Why no adapter.gguf can be written for this run, or None. Asked before the run folder exists: --gguf
        require refuses here, auto says so in one line and trains on."""
        if self.cfg.gguf == "off":
            return None
        from peft.tuners.lora import LoraLayer

        modules = [name for name, m in self.model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
        cause = exportable(self.spec, self.model.peft_config["default"].to_dict(), modules, self.out / "adapter")
        if cause is not None:
            if self.cfg.gguf == "require":
                raise UserError(f"--gguf require: this run's adapter cannot be exported to GGUF: {cause}")
            self.log(f"note: no adapter.gguf will be written: {cause}")
        return cause

    # --- preserve: locality during training (training.preserve) and after it (training.locality) ---------------
    def replay_text(self) -> list[list[int]] | None:
        if not self.cfg.preserve:
            return None

        return replay_windows(self.spec, self.tokenizer, self.cfg.preserve_text, self.log, self.model)

    def preserve_term(self):
        """The preserve term: the base's distribution on the replay text, computed once with the adapter off."""
        if self.replay is None:
            return None

        return Preserve(self.model, self.replay, self.cfg.preserve_weight, self.cfg.seed, self.device,
                        first_layer=min(self.layers))

    def measure_locality(self) -> dict:
        """Base against tuned on the measure half of the default reference (torch, adapter off for the base), from
        the first adapted layer when training could start there (its frozen prefix agreed with the full pass);
        the base's side read from the cache (shipped for the default model) after its first computation. That side
        is the float base's: a --deploy run holding a quantised base's weights runs both passes on them."""
        windows = reference_windows(self.spec, "measure", self.log, (self.model, self.tokenizer))
        first = min(self.layers) if self.prefix is not None else 0
        cache = None
        if self.deploy is None or self.deploy.target.current == "float":
            cache = base_side_path(self.spec, windows, str(next(self.model.parameters()).dtype))
        return torch_locality(self.model, windows, self.device, first_layer=first, base_cache=cache)

    # --- data order ------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[int]:
        """Sample indices of an epoch: a seeded shuffle (a pure function of seed and epoch, so a resumed run
        sees the same batches), or the curriculum's exposed prefix in its fixed order."""
        if self.curriculum is not None:
            return self.curriculum.exposed(epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def batches(self):
        """(step, epoch, indices) for every step of the run."""
        step, epoch = 0, 0
        while True:
            order = self.epoch_order(epoch)
            for i in range(0, len(order), self.cfg.batch_size):
                step += 1
                if step > self.total_steps:
                    return
                yield step, epoch, order[i: i + self.cfg.batch_size]
            epoch += 1

    def examples_seen(self) -> int:
        """Entries trained on so far: the sum of the batch sizes of steps 1..step (a partial batch as it is)."""
        return sum(len(idx) for _, _, idx in itertools.islice(self.batches(), self.step))

    # --- the forward pass ------------------------------------------------------------------------------
    def frozen_prefix(self) -> forward.FrozenPrefix | None:
        """The output of the frozen layers under the adapter, computed once (None: nothing below it, or too big
        to keep, in which case every step recomputes it and the log says so)."""
        first = min(self.layers)
        if first == 0:
            return None
        size = forward.FrozenPrefix.size_bytes(self.model, self.examples)
        if size > forward.FrozenPrefix.BUDGET_BYTES:
            self.log(f"note: the {first} frozen layers under the adapter are recomputed every step (keeping their "
                     f"output would take {size / 2**30:.1f} GiB)")
            return None
        prefix = forward.FrozenPrefix(self.model, self.examples, first, self.pad_id, self.device)
        if not prefix.agrees(self.model, self.examples, self.pad_id, self.device):
            self.log("note: this model's forward pass cannot start at the first adapted layer; the frozen layers "
                     "are recomputed every step")
            return None
        return prefix

    def evaluate(self) -> forward.Recall:
        """A clean pass over every entry (from the frozen prefix when there is one); with --deploy, in every
        deployment form."""
        def clean(prefix):
            return forward.evaluate(self.model, self.examples, self.pad_id, self.device, prefix=prefix,
                                    margin=self.cfg.margin, sampler=self.sampler)
        return clean(self.prefix) if self.deploy is None else self.deploy.evaluate(clean)

    def answer_ce(self, batch):
        """Per-token CE, correctness and logit margin; with --deploy, each token's worst deployment form."""
        def once():
            return forward.answer_ce(self.model, batch, self.sampler)
        return once() if self.deploy is None else self.deploy.answer_ce(once, batch)

    # --- the objective -----------------------------------------------------------------------------------
    def objective(self, ce, correct, batch, idx, margin=None):
        """(loss or None to skip the step, number of hard tokens). With --margin, MemFT-OT also trains a token
        whose logit margin is still under it."""
        hard = int(hard_tokens(ce, batch.mask).sum())
        method = self.cfg.method
        if method == "sft":
            return weighted_mean(ce, sft_weights(ce, batch.mask)), hard
        if method == "memft-ot":
            under = margin < self.cfg.margin if (margin is not None and self.cfg.margin > 0) else None
            threshold = max(self.cfg.train_threshold, self.cfg.tail_threshold if self.tail else 0.0)
            return ot_loss(ce, batch.mask, self.cfg.no_hard_tokens, threshold, self.cfg.floor, under)
        if self.sw_form == "temporal":  # OT weights, skipping steps with nothing above threshold
            return ot_loss(ce, batch.mask, "skip")
        return sliding_loss(ce, batch.mask, correct, [self.sliding[i] for i in idx], SlidingConfig()), hard

    # --- the loop ----------------------------------------------------------------------------------------
    def train_step(self, step: int, epoch: int, idx: list[int]) -> dict:
        """One optimiser step on the samples idx; returns its metrics row."""
        t0 = time.perf_counter()
        batch = forward.collate([self.examples[i] for i in idx], self.pad_id, self.device, self.prefix, idx,
                                self.sampler)
        ce, correct, margin = self.answer_ce(batch)
        self.latest.update(idx, ce, batch.mask, margin, self.cfg.margin)
        loss, hard = self.objective(ce, correct, batch, idx, margin)
        kept = None
        if loss is not None and self.preserve is not None:
            kept = self.preserve.loss(self.model, step)
            loss = loss + kept
        if loss is not None:
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # a skipped update still spends its step of the schedule, by design
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        self.step = step
        n_tok = int(batch.mask.sum())
        return {"step": step, "epoch": epoch, "lr": lr, "objective": None if loss is None else round(loss.item(), 6),
                "ce": round((ce.sum() / n_tok).item(), 6), "above": round(1 - hard / n_tok, 6), "hard_tokens": hard,
                "answer_tokens": n_tok, "tokens_per_s": round(n_tok / (time.perf_counter() - t0), 1)} | (
                    {} if kept is None else {"preserve": round(kept.item(), 6)})

    def run(self, progress=None) -> dict:
        try:
            return self.loop(progress)
        finally:
            self.close()

    def loop(self, progress=None) -> dict:
        cfg = self.cfg
        finished = runs.read_summary(self.out) if self.resumed else None
        if finished is not None:
            self.log(f"{self.out} already finished; nothing to resume")
            return finished
        self.prefix = self.frozen_prefix() if self.deploy is None else self.deploy.frozen_prefixes(self.frozen_prefix)
        self.preserve = self.preserve_term()
        if self.l_init is None:
            with self.model.disable_adapter():
                self.l_init = self.evaluate().mean_ce
        self.log(f"{len(self.examples)} entries, {self.l} answer tokens, rank {cfg.rank}, {self.params:,} trainable "
                 f"parameters, layers {self.layers} {'/'.join(self.modules)}; L_init {self.l_init:.4f}")
        metrics = runs.MetricsLog(self.out)
        self.model.train()
        recall, recall_step, stop_reason, certified_at = None, None, "budget", None
        started = time.perf_counter() - self.wall
        try:
            for step, epoch, idx in self.batches():
                if step <= self.step:
                    continue
                row = self.train_step(step, epoch, idx)
                if not (step % cfg.log_every == 0 or step == self.total_steps):
                    row = None
                checked = step % cfg.check_every == 0 or step == self.total_steps
                if (checked and self.gated and step != self.total_steps
                        and self.latest.above < cfg.tail_from - GATE_SLACK):
                    checked, self.tail = False, False  # too far from certified for a clean pass to certify
                    row = (row or {"step": step, "epoch": epoch}) | {"latest_above": round(self.latest.above, 6)}
                if checked:
                    recall, recall_step = self.evaluate(), step
                    self.tail = recall.above >= cfg.tail_from
                    row = (row or {"step": step, "epoch": epoch}) | {
                        "exact_match": recall.exact_match, "certified": recall.certified_rate,
                        "clean_ce": round(recall.mean_ce, 6), "clean_above": round(recall.above, 6)}
                if row is not None:
                    metrics.write(row)
                if progress is not None:
                    progress(step, self.total_steps, row or {})
                done = cfg.until_recall and checked and recall.certified_rate == 1.0
                if done and self.deploy is not None:  # llama.cpp on the deployed files decides
                    done = self.deploy.check(self.model, self.examples, self.out, step)
                    metrics.write({"step": step, "deploy": self.deploy.rows})
                self.wall = time.perf_counter() - started
                if step % cfg.checkpoint_every == 0 or done:
                    metrics.flush()
                    self.save_checkpoint()
                if done:
                    stop_reason, certified_at = "certified", step
                    break
        except NonFiniteLoss as e:
            metrics.close()
            raise UserError(f"training stopped: {e}; {self.discard_bad_checkpoints()} (try a lower --lr)") from None
        metrics.close()
        # The last step is always a check step, so its clean pass is the final one; recompute only if the loop
        # ran no step (a resumed run whose newest checkpoint is its last step).
        final = recall if recall_step == self.step else None
        return self.finish(stop_reason, certified_at, final)

    def finish(self, stop_reason: str, certified_at: int | None, final: forward.Recall | None = None) -> dict:
        final = final or self.evaluate()
        cfg = self.cfg
        summary = {
            "method": cfg.method, "sw_form": self.sw_form, "model": self.spec.name, "rank": cfg.rank,
            "alpha": cfg.alpha if cfg.alpha is not None else cfg.rank, "layers": self.layers, "modules": self.modules,
            "params": self.params, "answer_tokens": self.l, "entries": len(self.examples),
            "l_init": self.l_init, "l_final": final.mean_ce, "delta_l": self.l_init - final.mean_ce,
            "exact_match": final.exact_match, "token_accuracy": final.mean_token_accuracy,
            "certified": final.certified_rate,
            "all_certified": final.certified_rate == 1.0, "above_threshold": final.above,
            "steps": self.step, "examples": self.examples_seen(), "total_steps": self.total_steps,
            "stop_reason": stop_reason, "certified_at_step": certified_at, "wall_seconds": round(self.wall, 3),
            "seed": cfg.seed, "gguf": None, "gguf_error": self.gguf_blocker,
        }
        if self.deploy is not None:
            summary["deploy"] = self.deploy.summary(self.model, self.examples, self.out, self.step)
        # The trained adapter and its summary first: whatever locality and export do next, they are kept.
        runs.save_adapter(self.out, self.model)
        runs.write_summary(self.out, summary)
        summary["locality"], summary["locality_error"] = None, None
        try:
            summary["locality"] = self.measure_locality()
        except Exception as e:  # noqa: BLE001 - a failed measurement must not lose the finished run
            summary["locality_error"] = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.log(f"warning: locality not measured: {summary['locality_error']}")
        runs.write_summary(self.out, summary)
        if cfg.gguf == "off" or self.gguf_blocker is not None:
            return summary
        try:
            export_adapter(self.out, runs.gguf_path(self.out), base=self.spec)  # ready for llama.cpp
            summary["gguf"] = "adapter.gguf"
        except Exception as e:  # noqa: BLE001 - a failed export must not lose the finished run
            cause = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            summary["gguf_error"] = cause
            runs.write_summary(self.out, summary)
            if cfg.gguf == "require":
                raise UserError(f"adapter.gguf could not be written ({cause}); {self.out}/adapter and "
                                "summary.json are kept: retry with `memcli export`") from None
            self.log(f"warning: no adapter.gguf written: {cause}. The adapter is in {self.out}/adapter "
                     "(PEFT format) and summary.json is written.")
            return summary
        runs.write_summary(self.out, summary)
        return summary

    # --- run folder --------------------------------------------------------------------------------------
    def write_config(self) -> None:
        record = {"settings": dataclasses.asdict(self.cfg),
                  "resolved": {"device": self.device, "layers": self.layers, "modules": self.modules,
                               "sw_form": self.sw_form, "total_steps": self.total_steps, "answer_tokens": self.l,
                               "entries": len(self.examples), "params": self.params},
                  "versions": versions(), "command": " ".join(sys.argv)}
        runs.write_config(self.out, record)

    def discard_bad_checkpoints(self) -> str:
        """After a non-finite loss at this step: the checkpoint of the step before holds the weights that produced
        it, so only older ones are good. With none left, a run folder this invocation created is removed."""
        runs.discard_checkpoints_from(self.out, self.step)
        kept = runs.latest_checkpoint(self.out)
        if kept is not None:
            return f"kept the last good checkpoint {kept}"
        if not self.resumed:
            runs.remove_run(self.out)
            return f"no good checkpoint had been written, so {self.out} was removed"
        return "no good checkpoint is left"

    def save_checkpoint(self, keep: int = 2) -> None:
        from peft import get_peft_model_state_dict

        state = {"step": self.step, "wall": self.wall, "l_init": self.l_init,
                 "adapter": get_peft_model_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                 "sliding": [dataclasses.asdict(s) for s in self.sliding], "tail": self.tail,
                 "latest": {"hard": self.latest.hard.tolist(), "tokens": self.latest.tokens.tolist()}}
        runs.write_checkpoint(self.out, self.step, lambda tmp: torch.save(state, tmp), keep)  # whole or absent

    def load_checkpoint(self) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        path = runs.latest_checkpoint(self.out)
        if path is None:
            self.log(f"--resume: no checkpoint in {self.out}; starting from the beginning")
            self.write_config()
            runs.remove_metrics(self.out)
            return
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
            expected = set(get_peft_model_state_dict(self.model))
            if not isinstance(state, dict) or set(state["adapter"]) != expected:
                raise ValueError("its adapter tensors are not this run's")
            set_peft_model_state_dict(self.model, state["adapter"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if state["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            self.sliding = [SlidingState.from_dict(s) for s in state["sliding"]]
            if len(self.sliding) != len(self.examples):
                raise ValueError(f"it holds {len(self.sliding)} entries' state, the corpus has {len(self.examples)}")
            self.step, self.wall, self.l_init = int(state["step"]), float(state["wall"]), state["l_init"]
            self.tail = bool(state.get("tail", False))
            if "latest" in state:  # what the gate of clean checks decides on (checkpoints before it had none)
                self.latest.hard[:] = state["latest"]["hard"]
                self.latest.tokens[:] = state["latest"]["tokens"]
        except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                pickle.UnpicklingError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--resume: checkpoint {path} is corrupt or not from this run ({first}); delete it to "
                            "resume from an older one, or use --force to start over") from None
        # Metrics past the checkpoint belong to the interrupted attempt (a line cut short by it too): drop them.
        runs.trim_metrics(self.out, self.step)
        self.log(f"resuming from {path} (step {self.step})")

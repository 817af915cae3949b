"""One trainer for every stage (SentenceVAE, SLLM, token-level baseline).

A stage is a `Task`: it builds the model, serves batches by (epoch, index),
and computes the loss. The trainer owns the rest: DDP (torchrun, gloo on CPU,
nccl on GPU), AdamW, warm-up + cosine, gradient clipping, EMA, mixed
precision, atomic checkpoints with exact resume, a progress bar and a
metrics log (loss, target tokens/s, and MFU on CUDA).

Exact resume: the data order is a pure function of (seed, epoch), the data
position is (epoch, step in epoch), the LR is a pure function of the step,
and model, EMA, optimizer and every process's RNG state are saved. Each rank
reads batches rank, rank + world, ... of an epoch; the checkpoint records the
next one of every rank and the dataset's id, and a resume on other data is refused.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sllm.training import checkpoint as ckpt
from sllm.training.config import TrainConfig, save_json


class Task(Protocol):
    dataset_id: str  # the prepared dataset's id (its manifest), checked on resume

    def build_model(self) -> nn.Module: ...

    def num_batches(self, epoch: int) -> int: ...  # global batches in one epoch

    def batch(self, epoch: int, index: int) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]: ...  # (mean loss, target tokens)

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def save_files(self, directory: Path) -> None: ...  # tokenizer and such, beside the weights


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from lr/1000 (paper), then cosine down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        start = cfg.lr / 1000
        return start + (cfg.lr - start) * step / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Distributed:
    """rank/world from torchrun's environment; a single process otherwise."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self, in_step: bool = True) -> None:
        """in_step: every rank got here the same way (a finished run), so a barrier first makes sure no
        collective is still in flight when the group goes; after an error on one rank it would only hang."""
        if self.world > 1 and dist.is_initialized():
            if in_step:
                dist.barrier()
            dist.destroy_process_group()


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    def __init__(self, task: Task, cfg: TrainConfig, run_config, log=print):
        self.task, self.cfg, self.run_config = task, cfg, run_config
        self.dist = Distributed()
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.out = Path(cfg.out_dir)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.model = task.build_model().to(self.dist.device)
        self.ema = {k: v.detach().float().clone() for k, v in self.model.state_dict().items()}
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
        )
        self.step, self.epoch, self.pos = 0, 0, 0
        self.tokens_seen = 0  # target tokens over all processes, for the record
        self.autocast_dtype = self._autocast_dtype()
        self.flops_per_token, self.peak_flops = self._flops()
        torch.manual_seed(cfg.seed + 1000 * self.dist.rank)  # per-rank stream (dropout)

    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.precision
        if p == "bf16" or (p == "auto" and self.dist.device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return None

    def _flops(self) -> tuple[float, float | None]:
        """(model FLOPs per target token, the device's peak bf16 FLOP/s): MFU on CUDA only."""
        if self.dist.device.type != "cuda":
            return 0.0, None
        from sllm.training.sizing import flops_per_token, peak_bf16_flops

        return flops_per_token(self.run_config, self.model), peak_bf16_flops(torch.cuda.get_device_name(self.dist.device))

    # ------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        rng_states = self.dist.gather(_rng_state(self.dist.device))
        name = f"checkpoints/step_{self.step:08d}"
        if self.dist.is_main:
            opt_tensors, opt_meta = ckpt.optimizer_to_tensors(self.opt)

            def write(d: Path) -> None:
                ckpt.save_tensors(self.model.state_dict(), d / "model.safetensors")
                ckpt.save_tensors(self.ema, d / "ema.safetensors")
                ckpt.save_tensors(opt_tensors, d / "optimizer.safetensors", opt_meta)
                for r, state in enumerate(rng_states):
                    ckpt.save_tensors(state, d / f"rng_rank{r}.safetensors")
                state = {"step": self.step, "epoch": self.epoch, "pos": self.pos, "world_size": self.dist.world,
                         "tokens_seen": self.tokens_seen, "data": self._data_position()}
                (d / "trainer_state.json").write_text(json.dumps(state, indent=2))
                save_json(self.run_config, d / "config.json")
                self.task.save_files(d)

            ckpt.write_checkpoint_dir(self.out / name, write)
            self._point_latest_at(self.out / name)
            self._prune(self.out / name)
        self.dist.barrier()
        return self.out / name

    def _data_position(self) -> dict:
        """Where each rank's data stands: the batch of the epoch it reads next (pos * world + rank)."""
        return {"dataset_id": getattr(self.task, "dataset_id", ""), "epoch": self.epoch,
                "next_batch": [self.pos * self.dist.world + r for r in range(self.dist.world)]}

    def _point_latest_at(self, checkpoint: Path) -> None:
        ckpt.atomic_write_text(self.out / "latest", checkpoint.relative_to(self.out).as_posix() + "\n")
        ckpt.fsync_dir(self.out)

    def _prune(self, current: Path) -> None:
        """Keep `current` and the newest keep_checkpoints - 1 before it. Any after it are gone too:
        they belong to the history this run left when it resumed from an older checkpoint."""
        older = [d for d in (self.out / "checkpoints").glob("step_*") if ckpt.step_of(d) is not None and d != current]
        older.sort(key=ckpt.step_of, reverse=True)
        now = ckpt.step_of(current)
        keep = [d for d in older if ckpt.step_of(d) < now][: max(0, self.cfg.keep_checkpoints - 1)]
        for old in older:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def _checkpoint_to_resume(self) -> Path | None:
        """(Main process.) The checkpoint `latest` names or, when that one is missing or fails its
        manifest (a kill at a bad moment, a damaged disk), the newest complete one, said in the log
        and written to `latest`. None: a fresh run."""
        latest = self.out / "latest"
        named = self.out / latest.read_text().strip() if latest.is_file() else None
        candidates = ([named] if named is not None else []) + [
            d for d in ckpt.complete_checkpoints(self.out) if d != named]
        problems = []
        for d in candidates:
            try:
                ckpt.verify_checkpoint_dir(d)
            except ckpt.CheckpointError as e:
                problems.append(str(e))
                continue
            if d != named:
                why = f"{latest} names {named}, which is not usable ({problems[0]})" if named is not None else \
                    f"{latest} is missing"
                self.log(f"{why}: resuming from the newest complete checkpoint, {d}")
                self._point_latest_at(d)
            return d
        if named is not None or problems:
            raise ckpt.CheckpointError(f"cannot resume {self.out}: no complete checkpoint ({'; '.join(problems)}); "
                                       "delete the run directory to start over")
        return None

    def resume(self) -> bool:
        pick: tuple[str, str | None] = ("", None)
        if self.dist.is_main:
            try:
                chosen = self._checkpoint_to_resume()
                pick = ("", None if chosen is None else str(chosen))
            except ckpt.CheckpointError as e:
                pick = (str(e), None)
        error, chosen = self.dist.gather(pick)[0]  # every rank loads rank 0's pick (or fails with it)
        if error:
            raise ckpt.CheckpointError(error)
        if chosen is None:
            return False
        d = Path(chosen)
        state = ckpt.read_trainer_state(d)
        data = state.get("data")  # absent from checkpoints older than prepared datasets
        if data and data["dataset_id"] != getattr(self.task, "dataset_id", ""):
            raise ckpt.CheckpointError(
                f"{d} was trained on prepared dataset {data['dataset_id']}, this run reads "
                f"{getattr(self.task, 'dataset_id', '')!r}: resume on the same data (data.dataset) for an exact "
                "continuation, or start a new run directory")
        if state["world_size"] != self.dist.world:
            raise ckpt.CheckpointError(
                f"{d} was written by {state['world_size']} processes; resume with the same --nproc_per_node "
                f"(now {self.dist.world}) for an exact continuation")
        ckpt.load_state_into(self.model, ckpt.load_tensors(d / "model.safetensors"), str(d))
        ema = ckpt.load_tensors(d / "ema.safetensors")
        if set(ema) != set(self.ema):
            raise ckpt.CheckpointError(f"EMA weights in {d} do not match the model")
        self.ema = {k: v.to(self.dist.device) for k, v in ema.items()}
        opt_path = d / "optimizer.safetensors"
        ckpt.optimizer_from_tensors(self.opt, ckpt.load_tensors(opt_path), ckpt.read_metadata(opt_path))
        _set_rng_state(ckpt.load_tensors(d / f"rng_rank{self.dist.rank}.safetensors"), self.dist.device)
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        if data:
            self.pos = (data["next_batch"][self.dist.rank] - self.dist.rank) // self.dist.world
        self.tokens_seen = state.get("tokens_seen", 0)
        self.log(f"resumed from {d} at step {self.step}")
        return True

    # ------------------------------------------------------------ training

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                self.ema[k].lerp_(v.float(), 1 - decay)
            else:
                self.ema[k].copy_(v)

    def ema_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # building a model must not move the training RNG
            model = self.task.build_model().to(self.dist.device)
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.ema.items()})
        return model.eval()

    def _log_row(self, row: dict) -> None:
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _trim_metrics(self) -> bool:
        """(Main process, at the start.) Drop the rows of steps after the one this run resumes from
        (a killed run logged them; they will be logged again) and a torn last line, in one atomic
        rewrite. True when the log already holds an evaluation of this step."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return False
        text = path.read_text(errors="replace")
        kept, dropped, evaluated = [], 0, False
        for line in text.splitlines():
            try:
                row = json.loads(line)
                keep = isinstance(row, dict) and row["step"] <= self.step
            except (ValueError, KeyError, TypeError):
                keep = False
            if not keep:
                dropped += 1
                continue
            kept.append(line)
            evaluated |= row["step"] == self.step and any(k.startswith("val_") for k in row)
        if dropped or (text and not text.endswith("\n")):
            ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept))
            self.log(f"{path}: dropped {dropped} row(s) after step {self.step}, which this run logs again")
        return evaluated

    def fit(self) -> dict[str, float]:
        cfg, world = self.cfg, self.dist.world
        evaluated = False
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json(self.run_config, self.out / "config.json")
            ckpt.clean_stale_writes(self.out / "checkpoints", self.log)
        self.resume()
        if self.dist.is_main:
            evaluated = self._trim_metrics()
        start = self.step
        stop = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
        model = self.model
        if world > 1:
            model = DistributedDataParallel(self.model, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None)
        train_model = torch.compile(model) if cfg.compile else model
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"{n_params / 1e6:.2f} M parameters, {world} process(es) on {self.dist.device}, "
                 f"steps {self.step} -> {stop} (schedule {cfg.max_steps})")
        if self.dist.device.type == "cuda":
            peak = f"{self.peak_flops / 1e12:.0f} TFLOP/s bf16 peak" if self.peak_flops else "peak unknown: no MFU"
            self.log(f"{torch.cuda.get_device_name(self.dist.device)}: {peak}; "
                     f"{self.flops_per_token / 1e9:.3f} GFLOP a target token")

        bar = None
        if self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=stop, initial=self.step, dynamic_ncols=True, mininterval=2.0, disable=None)
        window_tokens, window_loss, window_n, t0 = 0.0, 0.0, 0, time.perf_counter()
        last_eval: dict[str, float] = {}
        model.train()
        terminate = self._catch_sigterm()
        finished = False
        try:
            while self.step < stop:
                if terminate.is_set():
                    self.log(f"SIGTERM: saving step {self.step} so the run can resume")
                    self.save()
                    raise SystemExit(128 + signal.SIGTERM)
                steps_per_epoch = self.task.num_batches(self.epoch) // world
                if steps_per_epoch == 0:
                    raise RuntimeError("the training split is smaller than one batch per process; lower batch_size")
                if self.pos >= steps_per_epoch:
                    self.epoch, self.pos = self.epoch + 1, 0
                batch = self.task.batch(self.epoch, self.pos * world + self.dist.rank)
                lr = lr_at(self.step, cfg)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                ctx = (torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)
                       if self.autocast_dtype else contextlib.nullcontext())
                with ctx:
                    loss, n_tokens = self.task.loss(train_model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {self.step}; lower lr or check the data")
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self._update_ema()
                self.step += 1
                self.pos += 1
                window_tokens += n_tokens
                window_loss += loss.item()
                window_n += 1

                if self.step % cfg.log_every == 0 or self.step == stop:
                    elapsed = time.perf_counter() - t0
                    tokens = self.dist.sum(window_tokens)
                    self.tokens_seen += int(tokens)
                    row = {"step": self.step, "epoch": self.epoch, "loss": window_loss / window_n, "lr": lr,
                           "grad_norm": float(grad_norm), "tokens_per_s": tokens / max(elapsed, 1e-9),
                           "tokens_seen": self.tokens_seen, "time": time.time()}
                    if self.peak_flops:  # model FLOPs utilisation against the cards' peak bf16 rate
                        row["mfu"] = row["tokens_per_s"] * self.flops_per_token / (self.peak_flops * world)
                    self._log_row(row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                                        **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}))
                    window_tokens, window_loss, window_n, t0 = 0.0, 0.0, 0, time.perf_counter()
                if bar is not None:
                    bar.update(1)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != stop:
                    last_eval = self._evaluate()
                if self.step % cfg.save_every == 0 and self.step != stop:
                    self.save()
            if self.step > start:
                last_eval = self._evaluate()
                self.save()
            else:  # a finished run again: its checkpoint is there; evaluate, log it only if not yet logged
                last_eval = self._evaluate(log_row=not evaluated)
            finished = True
        except KeyboardInterrupt:
            if world == 1:
                self.log(f"interrupted: saving step {self.step} so the run can resume")
                self.save()
            raise
        finally:
            terminate.restore()
            if bar is not None:
                bar.close()
            # DDP holds the process group: drop it first, so its teardown (and the group's gloo threads')
            # runs inside destroy_process_group while every rank is still connected, not later in a
            # destructor after fit returns (a rank once hung there, joining a gloo thread, at exit)
            model = train_model = None
            gc.collect()
            self.dist.close(in_step=finished)
        return last_eval

    def _catch_sigterm(self) -> "_SignalFlag":
        """SIGTERM (a scheduler's preemption, `kill`, a background job that ignores Ctrl-C) ends a
        single-process run at the next step boundary, saved. Under torchrun the launcher owns it."""
        flag = _SignalFlag()
        if self.dist.world == 1 and threading.current_thread() is threading.main_thread():
            flag.catch(signal.SIGTERM)
        return flag

    def _evaluate(self, log_row: bool = True) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.dist.is_main:
            with torch.no_grad():
                metrics = self.task.evaluate(self.ema_model())
            if log_row:
                self._log_row({"step": self.step, **{f"val_{k}": v for k, v in metrics.items()}, "time": time.time()})
            self.log(f"step {self.step}: " + ", ".join(f"val {k} {v:.4g}" for k, v in metrics.items()))
        self.dist.barrier()
        return metrics


class _SignalFlag(threading.Event):
    """Set by a signal; the handler it replaced comes back with restore()."""

    def catch(self, signum: int) -> None:
        self._signum, self._previous = signum, signal.signal(signum, lambda *_: self.set())

    def restore(self) -> None:
        if hasattr(self, "_previous"):
            signal.signal(self._signum, self._previous)

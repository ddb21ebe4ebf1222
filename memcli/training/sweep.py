"""`memcli sweep`: one ordinary run folder per (rank, answer tokens) cell, for fitting the memory law.

Cells are independent: a finished cell (summary.json present) is skipped, a started one resumes from its newest
checkpoint. They run in this process, in parallel worker processes (`--jobs`), or as Ray tasks. A rerun with
other training settings is refused before any work (a law fitted on cells of two settings means nothing), unless
`--force` asks to retrain the cells whose settings differ.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import yaml

from memcli.core import runs
from memcli.core.errors import UserError
from memcli.core.models import cache_dir
from memcli.core.signals import Terminated, handle_sigterm
from memcli.training.config import TrainConfig, describe_differences, setting_differences
from memcli.training.trainer import Trainer


def cell_name(rank: int, answer_tokens: int) -> str:
    return f"rank{rank}-l{answer_tokens}"


def grid(base: TrainConfig, ranks: list[int], lengths: list[int]) -> list[tuple[str, TrainConfig]]:
    if not ranks or not lengths:
        raise UserError("--ranks and --answer-tokens each need at least one value")
    for r in ranks:
        if r < 1:
            raise UserError(f"--ranks: every rank must be at least 1, got {r}")
    for n in lengths:
        if n < 1:
            raise UserError(f"--answer-tokens: every length must be at least 1, got {n}")
    return [(cell_name(r, n), dataclasses.replace(base, rank=r, answer_tokens=n)) for n in lengths for r in ranks]


def stale_cells(cells: list[tuple[str, TrainConfig]], out: Path) -> list[tuple[str, list]]:
    """(cell, differences) for every existing cell folder whose config.yaml records settings other than the ones
    this sweep would train it with (resolved values: `--device auto` and the device it resolved to are equal)."""
    stale = []
    for name, cfg in cells:
        if not runs.is_run(out / name):
            continue
        try:
            saved = runs.read_settings(out / name)
        except UserError as e:
            raise UserError(f"sweep cell {out / name}: {e}; remove the cell or use --force to retrain it") from None
        differs = setting_differences(saved, cfg)
        if differs:
            stale.append((name, differs))
    return stale


def run_cell(settings: dict, run_dir: str, device: str | None = None, threads: int | None = None,
             driver: dict | None = None) -> dict:
    """Train one cell to its end (or pick up its summary). A plain top-level function, so worker processes and
    Ray tasks can run it. A Ray worker starts in the folder `ray start` ran in, with that command's environment and
    its own command line: `driver` gives it the sweep's folder (`cwd`, for relative corpus and --out paths), model
    cache (`cache`) and command (`argv`, recorded in config.yaml), as a spawned worker process inherits them."""
    if driver:
        try:
            os.chdir(driver["cwd"])
        except OSError:
            import socket

            raise UserError(f"the sweep's folder {driver['cwd']} is not on Ray node {socket.gethostname()}: "
                            "--executor ray needs the corpus, the sweep folder and the model cache on a file "
                            "system every Ray node shares") from None
        os.environ["MEMCLI_CACHE"] = driver["cache"]
        argv, sys.argv = sys.argv, list(driver["argv"])
        try:
            return run_cell(settings, run_dir, device, threads)
        finally:
            sys.argv = argv
    run = Path(run_dir)
    summary = runs.read_summary(run)
    if summary is not None:
        return summary
    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = TrainConfig(**settings)
    if device:
        cfg.device = device
    resume = runs.is_run(run)
    return Trainer(cfg, run, resume=resume, log=lambda m: None).run()


def _worker_init(queue) -> None:
    """Worker initializer: SIGTERM unwinds a cell like Ctrl-C (its checkpoint and lock are cleaned up), and with
    GPUs each worker process takes one GPU for its whole life."""
    handle_sigterm()
    if queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(queue.get())


def _ray_runner(base: TrainConfig):
    """(submit, wait) for Ray tasks on the cluster at RAY_ADDRESS (else a local one, or the one this process has
    already started with ray.init). Each task takes one CPU, and one GPU where the cluster has GPUs and the device
    allows one; a cell the cluster could never place is refused here rather than left waiting forever. wait returns
    the next finished (ref, summary); a failed cell raises, after the other cells are cancelled: a UserError from the
    cell (or a worker without memcli) as one UserError naming the cell, anything else as Ray's error with the
    worker's traceback."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'memcli[ray]'") from None

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        _check_reachable(address)
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--executor ray: cannot connect to the Ray cluster at {address or 'this machine'} "
                            f"({cause}). Ray 2.60's `ray start` turns on token authentication: give this process "
                            "the cluster's token (RAY_AUTH_TOKEN, or ~/.ray/auth_token), or start a local instance "
                            "with RAY_AUTH_MODE=disabled") from None
    resources = ray.cluster_resources()
    if resources.get("CPU", 0) < 1:
        raise UserError(f"--executor ray: the Ray cluster has no CPU for a cell (its resources: {resources})")
    gpus = 1 if resources.get("GPU", 0) >= 1 and base.device != "cpu" else 0
    if base.device.startswith("cuda") and not gpus:
        raise UserError(f"--device {base.device} with --executor ray: the Ray cluster has no GPU; use --device auto "
                        "or cpu")
    remote = ray.remote(num_gpus=gpus, num_cpus=1)(run_cell)
    driver = {"cwd": os.getcwd(), "cache": str(cache_dir().resolve()), "argv": list(sys.argv)}
    device = "cuda:0" if gpus and base.device.startswith("cuda") else None  # a task sees only its own GPU

    def submit(settings, run_dir):
        return remote.remote(settings, run_dir, device, None, driver)

    def wait(pending: dict):
        done, _ = ray.wait(list(pending), num_returns=1)
        try:
            return done[0], ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            _cancel(ray, [ref for ref in pending if ref != done[0]])
            cell = pending[done[0]]
            if isinstance(e.cause, UserError):
                raise UserError(f"sweep cell {cell}: {e.cause}") from None
            if "failed to import on the worker" in str(e):
                raise UserError(f"sweep cell {cell}: a Ray worker could not import memcli; install memcli into the "
                                "Python environment the Ray nodes run (the one `ray start` ran from)") from None
            raise
        except ray.exceptions.RayError:
            _cancel(ray, [ref for ref in pending if ref != done[0]])
            raise
    return submit, wait


def _check_reachable(address: str | None) -> None:
    """RAY_ADDRESS as host:port must answer: ray.init retries a dead address for minutes before it fails."""
    import re
    import socket

    match = re.fullmatch(r"\s*([\w.\-]+):(\d+)\s*", address or "")
    if not match:
        return  # unset (a local instance), auto, ray://...: Ray's own resolution
    try:
        socket.create_connection((match[1], int(match[2])), timeout=5).close()
    except OSError as e:
        raise UserError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                        "`ray start --head --port PORT` and set RAY_ADDRESS=HOST:PORT, or unset RAY_ADDRESS for a "
                        "local Ray instance") from None


def _cancel(ray, refs) -> None:
    """Stop the other cells of a failed sweep and collect their ends, so Ray reports no unhandled errors."""
    for ref in refs:
        ray.cancel(ref, force=True)
    for ref in refs:
        try:
            ray.get(ref, timeout=30)
        except Exception:
            pass


def run_sweep(base: TrainConfig, ranks: list[int], lengths: list[int], out: Path, jobs: int = 1,
              executor: str = "local", on_done: Callable[[str, dict, int, int], None] | None = None,
              force: bool = False, log: Callable[[str], None] = lambda m: None,
              skip_above_certified: bool = False, out_option: str = "--out") -> list[dict]:
    """Train every cell not yet finished; returns the summaries in grid order. Existing cells trained with other
    settings are refused (UserError), or with `force` removed and trained again. With `skip_above_certified`
    (cells one at a time, in grid order), a cell is not trained when a lower rank already certified every entry at
    its length: a larger adapter would too, and a saturated run adds nothing to the law's fit."""
    cells = grid(base, ranks, lengths)
    if executor not in ("local", "ray"):
        raise UserError(f"--executor must be local or ray, got '{executor}'")
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if skip_above_certified and (jobs != 1 or executor != "local"):
        raise UserError("--skip-above-certified trains cells one at a time: it needs --jobs 1 and --executor local")
    ray_runner = _ray_runner(base) if executor == "ray" else None  # says how to install Ray before any work
    stale = stale_cells(cells, out)
    if stale and not force:
        name, differs = stale[0]
        others = f" (and {len(stale) - 1} more cell(s))" if len(stale) > 1 else ""
        raise UserError(f"sweep {out}: cell {name}{others} was trained with other settings (saved -> now): "
                        f"{describe_differences(differs)}; rerun with --force to retrain the stale cells, or use a "
                        f"new {out_option}")
    for name, differs in stale:
        log(f"{name}: settings changed ({describe_differences(differs)}); retraining it (--force)")
        with runs.RunLock(out / name, "sweep cell"):
            shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    record = {"ranks": ranks, "answer_tokens": lengths, "settings": dataclasses.asdict(base)}
    try:  # a rerun with part of the grid (or another process on more of it) adds to what the folder holds
        earlier = yaml.safe_load((out / "sweep.yaml").read_text())
        if earlier["settings"] == record["settings"]:
            for key in ("ranks", "answer_tokens"):
                record[key] = sorted(set(record[key]) | set(earlier[key]))
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        pass  # none yet, or not readable: this grid alone
    runs.write_text(out / "sweep.yaml", yaml.safe_dump(record, sort_keys=False), what="sweep file")
    results: dict[str, dict] = {}
    total = len(cells)

    def finished(name, summary):
        results[name] = summary
        if on_done:
            on_done(name, summary, len(results), total)

    pending_cells = []
    for name, cfg in cells:
        summary = runs.read_summary(out / name)
        if summary is not None:
            finished(name, summary)
        else:
            pending_cells.append((name, cfg))

    if ray_runner is not None:
        submit, wait = ray_runner
        futures = {submit(dataclasses.asdict(cfg), str(out / name)): name for name, cfg in pending_cells}
        while futures:
            ref, summary = wait(futures)
            finished(futures.pop(ref), summary)
    elif jobs == 1:
        certified = {(cfg.answer_tokens, cfg.rank) for name, cfg in cells
                     if name in results and results[name].get("all_certified")}
        for name, cfg in pending_cells:
            if skip_above_certified and any(n == cfg.answer_tokens and r < cfg.rank for n, r in certified):
                log(f"{name}: not trained (a lower rank certified every entry at this length)")
                continue
            finished(name, run_cell(dataclasses.asdict(cfg), str(out / name)))
            if results[name].get("all_certified"):
                certified.add((cfg.answer_tokens, cfg.rank))
    else:
        import torch

        n_gpu = torch.cuda.device_count() if base.device in ("auto", "cuda") else 0
        workers = min(jobs, n_gpu) if n_gpu else jobs
        threads = None if n_gpu else max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        gpu_queue = None
        if n_gpu:
            gpu_queue = context.Queue()
            for i in range(workers):
                gpu_queue.put(i)
        with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                    initargs=(gpu_queue,)) as pool:
            try:
                futures = {}
                for name, cfg in pending_cells:
                    device = "cuda:0" if n_gpu else None  # the worker sees only its own GPU
                    futures[pool.submit(run_cell, dataclasses.asdict(cfg), str(out / name), device, threads)] = name
                for future in cf.as_completed(futures):
                    finished(futures[future], future.result())
            except KeyboardInterrupt as e:
                pool.shutdown(wait=False, cancel_futures=True)
                if isinstance(e, Terminated):  # Ctrl-C reaches the workers too; a SIGTERM only this process
                    for child in multiprocessing.active_children():
                        child.terminate()  # each unwinds its cell as this process does
                raise
    return [results[name] for name, _ in cells if name in results]

"""Training jobs started from the page: one at a time, the rest in a visible queue, state on disk.

A job is a folder ``<runtime>/jobs/<id>/`` holding ``job.json`` (its state), ``data/<class>/*``
(the teaching set), ``progress.jsonl`` (written by ``train_head.py --progress-file``), ``train.log``
and ``out/`` (the archive, its report and confusion picture). Writing ``job.json`` is atomic, so the
state survives a page reload and a restart of the page server. A job found ``running`` or
``deploying`` at start-up was cut off by the restart: it is marked ``interrupted`` (its training
process, if still alive, is stopped). An interrupted deploy is safe by construction: ``deploy``
switches the default only after the new version passed its check, so the default is either the
old version or the checked new one, never a half-deployed one.

States: queued -> running -> trained | failed | interrupted;
trained -> deploying -> deployed | deploy_failed | interrupted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
from pathlib import Path

import psutil

from training.progress import read_progress

logger = logging.getLogger(__name__)

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_head.py"
JOB_FILE = "job.json"
ACTIVE = ("queued", "running", "deploying")
TRAIN_TIMEOUT_S = 3600.0  # a teaching set of 2000 photos on 2 cores takes minutes, not an hour
POLL_S = 0.5


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class JobStore:
    """Jobs on disk plus the single runner that trains them in order."""

    def __init__(self, root: Path, python: str = sys.executable):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.current: str | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._runner: asyncio.Task | None = None

    # -- state on disk ---------------------------------------------------------------------
    def folder(self, job_id: str) -> Path:
        if not re.fullmatch(r"[0-9]{8}T[0-9]{6}-[0-9a-f]{8}", job_id or ""):
            raise KeyError(job_id)
        return self.root / job_id

    def new_id(self) -> str:
        return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)

    def load(self, job_id: str) -> dict:
        try:
            return json.loads((self.folder(job_id) / JOB_FILE).read_text())
        except (FileNotFoundError, ValueError):
            raise KeyError(job_id) from None

    def save(self, job: dict) -> dict:
        job["updated"] = _now()
        path = self.folder(job["id"]) / JOB_FILE
        partial = path.with_suffix(".part")
        partial.write_text(json.dumps(job, indent=1))
        os.replace(partial, path)  # atomic: a reader or a restart sees the old or the new state
        return job

    def update(self, job_id: str, **changes) -> dict:
        job = self.load(job_id)
        job.update(changes)
        return self.save(job)

    def all(self) -> list[dict]:
        jobs = []
        for path in sorted(self.root.glob(f"*/{JOB_FILE}")):
            try:
                jobs.append(json.loads(path.read_text()))
            except ValueError:
                continue
        return jobs

    def view(self, job: dict) -> dict:
        """A job as the page sees it: state plus live progress and queue position."""
        shown = {k: v for k, v in job.items() if k not in ("pid", "archive", "data_dir")}
        shown["archive_file"] = Path(job["archive"]).name if job.get("archive") else None
        if job["status"] == "queued":
            waiting = [j["id"] for j in self.all() if j["status"] == "queued"]
            shown["queue_position"] = waiting.index(job["id"]) + 1 if job["id"] in waiting else None
            shown["training_now"] = self.current
        if job["status"] in ("running", "trained", "failed", "interrupted", "deploying", "deployed", "deploy_failed"):
            records = read_progress(self.folder(job["id"]) / "progress.jsonl")
            shown["progress"] = records[-1] if records else None
        return shown

    def create(self, job_id: str, name: str, version: str, counts: dict[str, int], backbone: str) -> dict:
        job = {"id": job_id, "name": name, "version": version, "classes": counts, "backbone": backbone,
               "status": "queued", "created": _now(), "data_dir": str(self.folder(job_id) / "data")}
        self.save(job)
        self.queue.put_nowait(job_id)
        logger.info("job %s: %s v%s on %s queued (%s)", job_id, name, version, backbone, counts)
        return job

    # -- start-up and the runner -------------------------------------------------------------
    def recover(self) -> None:
        """After a (re)start: cut-off jobs become ``interrupted``, queued ones are queued again."""
        for job in self.all():
            if job["status"] in ("running", "deploying"):
                _stop_leftover(job.get("pid"), self.folder(job["id"]))
                job.update(status="interrupted", error=f"the page server stopped while the job was {job['status']}"
                           + ("; the default version is unchanged unless the checked new version had already "
                              "taken over" if job["status"] == "deploying" else ""))
                self.save(job)
                logger.warning("job %s (%s v%s) was interrupted", job["id"], job["name"], job["version"])
            elif job["status"] == "queued":
                self.queue.put_nowait(job["id"])

    def start(self) -> None:
        self.recover()
        self._runner = asyncio.get_running_loop().create_task(self._run_forever())

    async def stop(self) -> None:
        if self._runner:
            self._runner.cancel()
        if self._process and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except asyncio.TimeoutError:
                self._process.kill()

    async def _run_forever(self) -> None:
        while True:
            job_id = await self.queue.get()
            try:
                if self.load(job_id)["status"] != "queued":
                    continue
                self.current = job_id
                await self._train(job_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let one job stop the runner
                logger.exception("job %s failed", job_id)
                self.update(job_id, status="failed", error=f"{exc.__class__.__name__}: {exc}", finished=_now())
            finally:
                self.current = None

    async def _train(self, job_id: str) -> None:
        job = self.load(job_id)
        folder = self.folder(job_id)
        command = [
            self.python, str(TRAIN_SCRIPT), job["data_dir"], "--name", job["name"], "--version", job["version"],
            "--backbone", job["backbone"], "--out", str(folder / "out"),
            "--progress-file", str(folder / "progress.jsonl"), "--no-progress",
        ]
        with open(folder / "train.log", "ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=log, cwd=str(folder))
            self.update(job_id, status="running", started=_now(), pid=self._process.pid)
            logger.info("job %s: training %s v%s (pid %d)", job_id, job["name"], job["version"], self._process.pid)
            try:
                stdout, _ = await asyncio.wait_for(self._process.communicate(), TRAIN_TIMEOUT_S)
            except asyncio.TimeoutError:
                self._process.kill()
                await self._process.wait()
                self.update(job_id, status="failed", error=f"training took longer than {TRAIN_TIMEOUT_S:.0f}s",
                            finished=_now())
                return
        code = self._process.returncode
        self._process = None
        if code != 0:
            self.update(job_id, status="failed", finished=_now(), exit_code=code, error=_last_error(folder / "train.log"))
            return
        archive = Path(stdout.decode().strip().splitlines()[-1])
        report = json.loads(archive.with_name(archive.name[: -len(".mar")] + ".report.json").read_text())
        self.update(job_id, status="trained", finished=_now(), archive=str(archive),
                    evaluation=summarise(report, Path(job["data_dir"])))
        logger.info("job %s: trained %s", job_id, archive.name)


def summarise(report: dict, data_dir: Path) -> dict:
    """What the page shows of a training report: scores, confusion, the wrong validation photos."""
    metrics = report.get("metrics") or {}
    wrong = []
    for item in report.get("wrong_validation", []):
        try:
            relative = Path(item["file"]).resolve().relative_to(data_dir.resolve())
        except ValueError:
            continue
        wrong.append({**item, "file": relative.as_posix()})
    return {
        "classes": list(metrics.get("per_class", {})),
        "images": metrics.get("images"),
        "accuracy": metrics.get("accuracy"),
        "balanced_accuracy": metrics.get("balanced_accuracy"),
        "per_class": metrics.get("per_class"),
        "confusion": metrics.get("confusion"),
        "wrong": wrong,
        "train_images": report.get("data", {}).get("train_images"),
        "val_images": report.get("data", {}).get("val_images"),
        "seconds": report.get("timings_s", {}).get("total"),
    }


def _last_error(log: Path) -> str:
    """The training log's last ERROR line (train_head logs why it stopped), else its last line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "training failed"
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["training failed"])[-1][:500]


def _stop_leftover(pid: int | None, folder: Path) -> None:
    """Stop a training process a previous page server left running (only if it is that job's)."""
    if not pid:
        return
    try:
        process = psutil.Process(pid)
        if str(folder) in " ".join(process.cmdline()):
            process.send_signal(signal.SIGTERM)
            process.wait(10)
    except (psutil.Error, psutil.TimeoutExpired):
        pass

"""One generation at a time on the loaded pair, fed by a bounded queue.

Generation is blocking compute, so it runs in one worker thread; each request waits for its turn
in a bounded queue (full: refused at once) and receives its events on its own asyncio queue: the
prompt size once the prompt is encoded, text pieces as the rounds produce them, then the result
or an error. A cancelled job (its client left, or the server is stopping) ends at the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field

from caddtree.errors import CaddtreeError
from caddtree.models.target import encode_prompt
from caddtree.server.protocol import StopScanner


OUTCOMES = ("completed", "cancelled", "rejected", "failed")  # how a job can end


class QueueFull(Exception):
    """No room for another request."""


@dataclass
class GenerationJob:
    """A request's generation: what to generate, and where its events go."""

    prompt: str | list[dict]
    raw: bool  # completions read the prompt as it is; chat goes through the template
    options: dict  # keyword arguments of Pair.generate: max_new_tokens, temperature, top_p, seed
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class GenerationWorker:
    """Runs jobs one after the other; `submit` raises QueueFull when `max_queue` jobs already wait."""

    def __init__(self, pair, generate_options: dict, max_queue: int):
        self.pair = pair
        self.generate_options = generate_options  # the server's method, budget, rule, cost model, lookup
        self.jobs: queue.Queue[GenerationJob | None] = queue.Queue(maxsize=max_queue)
        self.running: GenerationJob | None = None
        self.counts = Counter()  # finished jobs by outcome (OUTCOMES)
        self.thread = threading.Thread(target=self._serve, name="caddtree-generation", daemon=True)
        self.thread.start()

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: GenerationJob) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def stop(self) -> None:
        """Cancel what waits and what runs; the thread ends after the current round."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                self.counts["cancelled"] += 1
                job.send("error", (503, "the server is shutting down"))
        if self.running is not None:
            self.running.cancelled.set()
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():  # its client left while it waited
                self.counts["cancelled"] += 1
                continue
            self.running = job
            try:
                outcome = self._run(job)
            except Exception as error:  # noqa: BLE001: a fault here fails this job, never the worker
                outcome = "failed"
                with contextlib.suppress(RuntimeError):  # its event loop is gone: nobody to answer
                    job.send("error", (500, f"internal error: {type(error).__name__}"))
            finally:
                self.running = None
            self.counts["cancelled" if job.cancelled.is_set() else outcome] += 1

    def _run(self, job: GenerationJob) -> str:
        scanner = StopScanner(job.stops)
        stopped = False

        def on_text(piece: str) -> bool:
            nonlocal stopped
            safe, stopped = scanner.feed(piece)
            if safe:
                job.send("text", safe)
            return stopped or job.cancelled.is_set()

        try:  # the request's fault, found before its reply starts: an empty or too long prompt
            encode_prompt(self.pair.target, job.prompt, job.raw)
        except CaddtreeError as error:
            job.send("error", (400, str(error)))
            return "rejected"
        job.send("started")
        try:
            result = self.pair.generate(job.prompt, raw=job.raw, on_text=on_text, **job.options, **self.generate_options)
        except CaddtreeError as error:  # the request's fault, found by generation (e.g. past a sliding window)
            job.send("error", (400, str(error)))
            return "rejected"
        except Exception as error:  # noqa: BLE001: any failure inside generation is reported, and the server goes on
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            job.send("error", (500, f"generation failed: {type(error).__name__}: {first_line}"))
            return "failed"
        if not stopped:
            rest = scanner.flush()
            if rest:
                job.send("text", rest)
        job.send("done", (result, "stop" if stopped or result.finish_reason == "eos" else "length"))
        return "completed"

"""Hand each chunk's latents from the generating thread to a decoding thread.

The decoder (VAE, then whatever consumes the frames: quality metrics, the H.264
encoder) runs while the next chunks are generated. At most `depth` chunks wait in
between: when decoding falls behind, generation waits, so memory stays bounded for
any length. On a GPU the decoder runs on a CUDA stream of its own and waits, per
chunk, only for the kernels that produced that chunk.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable, Iterator

import torch

_END = object()


class ChunkPipe:
    def __init__(self, device: torch.device, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._result = None

    # -- the generating side -----------------------------------------------------------
    def put(self, latents: torch.Tensor) -> None:
        """Queue one chunk's latents (blocks while `depth` chunks wait); raises when the
        decoder has failed, so generation stops early."""
        if self.error is not None:
            raise RuntimeError(f"the decoder stopped: {self.error}") from self.error
        event = None
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record()  # on the generating thread's stream, after the chunk's kernels
        self.queue.put((latents, event))

    def finish(self):
        """No more chunks: wait for the decoder; returns its result or raises its error."""
        self.queue.put((_END, None))
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self._result

    def abort(self) -> None:
        """Generation failed: end the decoder's input and wait for it; its result is not wanted."""
        self.queue.put((_END, None))
        self._thread.join()

    # -- the decoding side ----------------------------------------------------------------
    def start(self, consume: Callable[[Iterator[torch.Tensor]], object]) -> "ChunkPipe":
        """Run consume(chunks) in a thread; chunks yields the queued latents in order."""
        self._thread = threading.Thread(target=self._run, args=(consume,), name="memflow-decode", daemon=True)
        self._thread.start()
        return self

    def _run(self, consume) -> None:
        self._ended = False
        try:
            stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
            with stream:
                self._result = consume(self._chunks())
        except BaseException as e:  # reported to the generating side by put() and finish()
            self.error = e
        while not self._ended:  # whatever still comes is dropped, so the generator never blocks
            self._ended = self.queue.get()[0] is _END

    def _chunks(self) -> Iterator[torch.Tensor]:
        while True:
            latents, event = self.queue.get()
            if latents is _END:
                self._ended = True
                return
            if event is not None:
                self.stream.wait_event(event)
                latents.record_stream(self.stream)  # its memory is not reused while this stream reads it
            yield latents

"""Checkpoints of stories in flight: the latents generated so far, under `state/<id>/`.

A long render (a 10-minute video, a tree of branches) saves its new latents every
`every_s` seconds (wall clock, while it generates: what a lost replica would cost). A retry after a lost replica, node or stall rebuilds
its state from them by replay (memflow/story.py) and generates only the rest; the video
it commits is the one an uninterrupted render gives.

Layout: each save writes one part, `part-<n>-<token>.safetensors` (the chunks since the
last save, each under its chunk key: latents are content-addressed, so a part can only
ever serve the chunks it was computed for), then `checkpoint.json`, the list of parts
with their sha256: the checkpoint's own commit marker, written last. An attempt that
dies while writing leaves a part that no list names, or a list naming a part whose bytes
do not hash to what it says: neither is used. A stale checkpoint (another script, model
or config under the same id) has keys no chunk of this render asks for. Checkpoints
live apart from records/ (a script is done iff its record exists) and are deleted once
every video of the story has committed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid

import torch
from safetensors.torch import load, save

from memflow.tree import Known

from .storage import Storage

log = logging.getLogger(__name__)


def state_dir(video_id: str) -> str:
    return f"state/{video_id}"


class Checkpoints:
    """The checkpoints of one story (by its root's id), read at the start of a render and
    written while it generates. Saving runs in a thread of its own (one save at a time),
    so generation waits only to copy the latents off the device."""

    def __init__(self, storage: Storage, video_id: str, every_s: float):
        self.storage, self.folder, self.every_s = storage, state_dir(video_id), every_s
        self.token = uuid.uuid4().hex[:8]  # this attempt's parts never overwrite another's
        self.parts: list[dict] = []  # the list in checkpoint.json
        self.pending: list[tuple[str, torch.Tensor]] = []  # chunks since the last save (on the device)
        self.last = time.monotonic()  # when the last save was (or the render began)
        self.saved = 0  # chunks saved
        self._saving: threading.Thread | None = None
        self.error: BaseException | None = None

    # -- reading ------------------------------------------------------------------------------
    def load(self) -> dict[str, Known]:
        """The chunk latents an earlier attempt saved, by key; what cannot be trusted is left out."""
        try:
            listing = json.loads(self.storage.read_text(f"{self.folder}/checkpoint.json"))
            parts = listing["parts"]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as e:  # a torn or foreign list: start afresh
            log.warning("ignoring the checkpoint list in %s: %s", self.folder, e)
            return {}
        known: dict[str, Known] = {}
        for part in parts:
            try:
                data = self.storage.read_bytes(f"{self.folder}/{part['name']}")
                if hashlib.sha256(data).hexdigest() != part["sha256"]:
                    raise ValueError("its bytes do not match the sha256 the list gives")
                tensors = load(data)
                for i, key in enumerate(part["keys"]):
                    known[key] = Known(tensors[f"chunk{i}"], "resumed")
            except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring checkpoint part %s/%s: %s", self.folder, part.get("name"), e)
                continue
            self.parts.append(part)  # still good: the next list keeps it
        return known

    # -- writing --------------------------------------------------------------------------------
    def add(self, key: str, latents: torch.Tensor) -> None:
        """A chunk generated; saves when `every_s` have passed since the last save."""
        if not self.every_s:
            return
        self.pending.append((key, latents))
        if time.monotonic() - self.last >= self.every_s:
            self.save()

    def save(self) -> None:
        """Save the pending chunks now (after the save before, if it still runs)."""
        if not self.pending:
            return
        self.wait()
        chunks = [(key, x.float().cpu().contiguous()) for key, x in self.pending]  # one device read per save
        self.pending, self.last = [], time.monotonic()
        self._saving = threading.Thread(target=self._write, args=(chunks,), name="memflow-checkpoint", daemon=True)
        self._saving.start()

    def _write(self, chunks: list[tuple[str, torch.Tensor]]) -> None:
        try:
            name = f"part-{len(self.parts):05d}-{self.token}.safetensors"
            data = save({f"chunk{i}": x for i, (_, x) in enumerate(chunks)})
            self.storage.write_bytes(f"{self.folder}/{name}", data)
            part = {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "keys": [k for k, _ in chunks]}
            self.storage.write_json(f"{self.folder}/checkpoint.json", {"parts": [*self.parts, part]})  # the commit
            self.parts.append(part)
            self.saved += len(chunks)
        except Exception as e:  # a checkpoint is an optimisation: the render goes on without it
            self.error = e
            log.warning("checkpoint of %s failed: %s", self.folder, e)

    def wait(self) -> None:
        if self._saving is not None:
            self._saving.join()
            self._saving = None

    def delete(self) -> None:
        """Everything under state/<id>/, the list first: the story has committed."""
        self.wait()
        self.storage.delete(f"{self.folder}/checkpoint.json")
        self.storage.delete_folder(self.folder)

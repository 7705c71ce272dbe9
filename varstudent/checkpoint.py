"""Resumable training state: a killed teacher or distill run continues from its last checkpoint.

A checkpoint is `epoch-NNNN.safetensors` (model, optimizer moments, every RNG state as uint8 tensors) plus
`epoch-NNNN.json` (epoch, loop state, history, optimizer hyper-parameters, the fingerprint, sha256 of the
tensors), both written atomically, the JSON last: a checkpoint exists once its JSON does. Nothing is
pickled. A checkpoint is only resumed when its fingerprint (digest of the stage's settings, the data's
sha256, the teacher's logits' hash) equals the current run's; otherwise the run starts fresh and says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from varstudent.artifacts import read_tensors, write_tensors
from varstudent.errors import ArtifactError

log = logging.getLogger("varstudent.checkpoint")

KIND = "varstudent-checkpoint"
_NAME = re.compile(r"epoch-(\d+)\.json")


def fingerprint_digest(parts: dict[str, Any]) -> str:
    """sha256 of a JSON-able description of what a run depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()


def _bytes_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8).copy())


def rng_states(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random stream a training step can touch: (byte tensors, JSON-able rest)."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.shuffle": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    _, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = _bytes_tensor(np.asarray(keys, dtype=np.uint32))
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = _bytes_tensor(np.asarray(internal, dtype=np.uint32))
    rest = {"numpy": {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "gauss_next": gauss_next}}
    return tensors, rest


def set_rng_states(tensors: dict[str, torch.Tensor], rest: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.shuffle"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    np_keys = tensors["rng.numpy"].numpy().view(np.uint32)
    n = rest["numpy"]
    np.random.set_state(("MT19937", np_keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = rest["python"]
    random.setstate((py["version"], tuple(int(v) for v in tensors["rng.python"].numpy().view(np.uint32)),
                     py["gauss_next"]))


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = optimizer.state_dict()
    tensors = {f"optim.{index}.{key}": value for index, state in sd["state"].items()
               for key, value in state.items() if isinstance(value, torch.Tensor)}
    odd = [(i, k) for i, s in sd["state"].items() for k, v in s.items() if not isinstance(v, torch.Tensor)]
    if odd:  # Adam keeps only tensors; anything else would be lost silently
        raise TypeError(f"optimizer state holds non-tensor entries {odd[:3]}")
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                    groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _loop_problem(loop: Any) -> str | None:
    """What is wrong with a checkpoint's training-loop state (the JSON part, which its sha256 does not cover),
    or None: the loop reads these fields and their types as it resumes."""
    if not isinstance(loop, dict):
        return f"not an object but {type(loop).__name__}"
    expected = {"history": list, "calm_epochs": int, "previous": (int, float, type(None)), "seconds": (int, float)}
    for key, kinds in expected.items():
        if key not in loop:
            return f"no {key!r}"
        if not isinstance(loop[key], kinds) or isinstance(loop[key], bool):
            return f"{key!r} is a {type(loop[key]).__name__}"
    if not all(isinstance(row, dict) for row in loop["history"]):
        return "'history' holds something other than objects"
    return None


@dataclass
class Resumed:
    """What the training loop needs to continue after `epoch` finished epochs."""

    epoch: int
    loop: dict[str, Any]


class Checkpointer:
    """Saves and restores the training state of one stage in `directory`, every `every` epochs."""

    def __init__(self, directory: Path, every: int, fingerprint: dict[str, Any], stage: str) -> None:
        self.directory, self.every, self.stage = Path(directory), every, stage
        self.fingerprint = dict(fingerprint)

    def due(self, epochs_done: int) -> bool:
        return self.every > 0 and epochs_done % self.every == 0

    def _saved(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.fullmatch(p.name))]
        return sorted(found, reverse=True)

    def last_good_epoch(self) -> int | None:
        saved = self._saved()
        return saved[0][0] if saved else None

    def save(self, epochs_done: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, loop: dict[str, Any]) -> Path:
        """Write the checkpoint after `epochs_done` epochs, then drop older ones (never before it exists)."""
        rng_tensors, rng_rest = rng_states(generator)
        optim_tensors, groups = _optimizer_parts(optimizer)
        tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **optim_tensors, **rng_tensors}
        doc = {"kind": KIND, "stage": self.stage, "epoch": epochs_done, "fingerprint": self.fingerprint,
               "loop": loop, "rng": rng_rest, "optimizer": {"param_groups": groups}}
        path = write_tensors(self.directory, f"epoch-{epochs_done:04d}", tensors, doc)
        for epoch, old in self._saved():
            if epoch != epochs_done:
                old.unlink(missing_ok=True)
                old.with_suffix(".safetensors").unlink(missing_ok=True)
        return path

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> Resumed | None:
        """Load the newest usable checkpoint into model, optimizer and RNGs; None = start from epoch 0.

        A checkpoint of other settings or data is never mixed in: the run starts fresh and says so.
        """
        for epoch, path in self._saved():
            try:
                doc, tensors = read_tensors(self.directory, path.stem, "checkpoint")
            except ArtifactError as exc:  # e.g. killed while writing, or damaged: an older one may do
                log.warning("%s: ignoring checkpoint %s (%s)", self.stage, path.name, exc)
                continue
            if doc.get("kind") != KIND or doc.get("stage") != self.stage:
                log.warning("%s: ignoring %s: not a %s checkpoint", self.stage, path.name, self.stage)
                continue
            if doc.get("fingerprint") != self.fingerprint:
                changed = sorted(k for k in set(self.fingerprint) | set(doc.get("fingerprint") or {})
                                 if (doc.get("fingerprint") or {}).get(k) != self.fingerprint.get(k))
                # kept until this run saves its own first checkpoint: an aborted rerun with other settings must
                # not cost the interrupted run its progress
                log.warning("%s: checkpoint of epoch %d in %s was made with different %s; starting fresh (it "
                            "stays until this run saves its first checkpoint)", self.stage, epoch, self.directory,
                            ", ".join(changed))
                return None
            problem = _loop_problem(doc.get("loop"))
            if problem:
                log.warning("%s: ignoring checkpoint %s (its loop state is damaged: %s)", self.stage, path.name,
                            problem)
                continue
            model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
            try:
                model.load_state_dict(model_state)
                _load_optimizer(optimizer, tensors, doc["optimizer"]["param_groups"])
                set_rng_states(tensors, doc["rng"], generator)
            except (RuntimeError, KeyError, ValueError, TypeError) as exc:
                log.warning("%s: checkpoint %s does not fit this model (%s); starting fresh (it stays until this "
                            "run saves its first checkpoint)", self.stage, path.name, str(exc).splitlines()[0][:200])
                return None
            log.info("%s: resuming from epoch %d (checkpoint %s)", self.stage, epoch, path)
            return Resumed(epoch=epoch, loop=doc["loop"])
        return None

    def clear(self) -> None:
        """Remove every checkpoint file of this stage (after it finished, or when its checkpoints are stale)."""
        if not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if p.suffix in (".json", ".safetensors", ".tmp") and p.name.startswith(("epoch-", ".epoch-")):
                p.unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass  # something else lives there; leave it

"""Is training reproducible on a CUDA GPU? Two identical teacher + distill runs per mode, compared bit for bit.

For runtime.deterministic true and false: train the same teacher and student twice on digits (in-process,
the stage functions the CLI calls), then compare metrics.json (without wall-clock fields) and the weight
files. Also checks a resume on the GPU: a distill run stopped after its checkpoint of epoch 2 and resumed
must equal the uninterrupted run. Prints one line per check.

    python benchmarks/gpu_determinism.py --out /tmp/gpu-det
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from varstudent import stages
from varstudent.config import load_params
from varstudent.stages import timing_key

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU it checks the script itself
BASE = ["data.dataset=digits", "tracking.enabled=false", f"runtime.device={DEVICE}", "runtime.progress=false",
        "teacher.arch=mlp-300-300", "teacher.epochs=4", "student.arch=mlp-100-50", "distill.epochs=5",
        "distill.batch_size=16", "distill.converge_tol=0"]


def _run(root: Path, data: Path, overrides: list[str], checkpoints: Path | None = None) -> dict:
    params = load_params(None, BASE + overrides)
    teacher_metrics = stages.teacher(params, data, root / "teacher")
    distill_metrics = stages.distill(params, data, root / "teacher", root / "distill", checkpoints)
    return {"teacher": {k: v for k, v in teacher_metrics.items() if not timing_key(k)},
            "distill": {k: v for k, v in distill_metrics.items() if not timing_key(k)},
            "teacher_weights": (root / "teacher/teacher.safetensors").read_bytes(),
            "student_weights": (root / "distill/student.safetensors").read_bytes()}


def _max_weight_diff(a: bytes, b: bytes) -> float:
    from safetensors.torch import load

    ta, tb = load(a), load(b)
    return max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/gpu-determinism")
    parser.add_argument("--data", help="an already prepared digits folder (a GPU machine without the data "
                        "validation stack); default: prepare it here")
    args = parser.parse_args()
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "prepare"
    if not args.data:
        stages.prepare(load_params(None, BASE), data)
    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}")
    for deterministic in ("true", "false"):
        a = _run(out / f"det-{deterministic}-a", data, [f"runtime.deterministic={deterministic}"])
        b = _run(out / f"det-{deterministic}-b", data, [f"runtime.deterministic={deterministic}"])
        same = {k: a[k] == b[k] for k in a}
        print(f"deterministic={deterministic}: identical {json.dumps(same)}; max |student weight diff| "
              f"{_max_weight_diff(a['student_weights'], b['student_weights']):.3g}, student accuracy "
              f"{a['distill']['student_accuracy']:.4f} vs {b['distill']['student_accuracy']:.4f}")
    # resume: stop the real distill run during epoch 3 (after its checkpoint of epoch 2), then rerun it
    import varstudent.train as train

    whole = _run(out / "resume-whole", data, [])
    original_fit = train.fit

    class Stop(Exception):
        pass

    def stopping_fit(model, x, y, loss_fn, settings, epoch_end=None, checkpoint=None, augment=None):
        def end(epoch):
            if settings.desc == "distill" and epoch == 2:  # dies during epoch 3, after the checkpoint of 2
                raise Stop
            return epoch_end(epoch) if epoch_end else {}
        return original_fit(model, x, y, loss_fn, settings, end, checkpoint, augment)

    stages.fit = stopping_fit
    try:
        _run(out / "resume-cut", data, [], out / "resume-ckpt")
    except Stop:
        pass
    finally:
        stages.fit = original_fit
    print(f"checkpoint left after the stop: {sorted(p.name for p in (out / 'resume-ckpt').iterdir())}")
    resumed = _run(out / "resume-cut", data, [], out / "resume-ckpt")
    same = {k: whole[k] == resumed[k] for k in whole}
    print(f"resume on {DEVICE} (deterministic=true): identical {json.dumps(same)}")


if __name__ == "__main__":
    main()

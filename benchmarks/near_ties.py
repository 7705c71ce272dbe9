"""What `export.near_tie_margin` buys: steps and bytes of the quantized sparse export, measured on a finished run.

The quantized export's steps keep every prediction on the test images and on the training images but their near
ties (export/quantized.py); a training image on which the student's two largest logits nearly tie, held, can
hold a layer to a far finer step. Per
margin this prints the layers' steps, the export's bytes and footprint below the teacher, how many training
images were left out as near ties and how many of those changed, and the test predictions that differ from the
masked student's (the parity rule: must be 0). Then the same with one synthetic near tie added to the training
images -- a point on the segment between two training images of different predictions, bisected until the two
largest logits are as close as float32 allows -- which is what a student with such an image meets by chance.

    python benchmarks/near_ties.py --run artifacts
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from varstudent.artifacts import load_model, read_json
from varstudent.data import load_prepared
from varstudent.export.quantized import Selection, top_two_margin
from varstudent.export.sparse import load_sparse, write_sparse
from varstudent.train import predict_logits


def synthetic_near_tie(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """An input between x[0] and the first image predicted otherwise, bisected to the decision boundary; and
    its top-two margin."""
    labels = predict_logits(net, x).argmax(1)
    near, far = x[0], x[int((labels != labels[0]).nonzero()[0])]
    with torch.no_grad():
        for _ in range(60):
            middle = (near + far) / 2
            if net(middle[None]).argmax(1) == labels[0]:
                near = middle
            else:
                far = middle
        return near, float(top_two_margin(net(near[None]))[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("artifacts"), help="a `varstudent run` OUT folder")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.001, 0.01, 0.1])
    args = parser.parse_args()
    data = load_prepared(args.run / "prepare")
    compact = load_model(args.run / "prune", "compact")
    reference = predict_logits(compact, data.x_test).argmax(1)  # the masked student's (prune checked it)
    teacher_bytes = sum(p.stat().st_size for p in (args.run / "teacher").glob("teacher.*"))
    margins = top_two_margin(predict_logits(compact, data.x_train)).sort().values
    print(f"command: python {' '.join(sys.argv)}")
    print(f"smallest top-two logit margins on the {data.x_train.shape[0]:,} training images: "
          + ", ".join(f"{m:.2g}" for m in margins[:6].tolist()))
    tie, tie_margin = synthetic_near_tie(compact, data.x_train)
    print(f"synthetic near tie: margin {tie_margin:.2g}")
    print(f"{'training images':<26}{'margin':>8}{'steps (log2)':>16}{'bytes':>8}{'x below teacher':>17}"
          f"{'left out':>10}{'changed':>9}{'test differ':>13}{'search s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, x_train in (("as prepared", data.x_train), ("+ 1 synthetic near tie", torch.cat([data.x_train,
                                                                                                    tie[None]]))):
            for margin in args.margins:
                start = time.perf_counter()
                write_sparse(compact, folder, "quantized", repeats=2,
                             select=[Selection(x_train, margin), Selection(data.x_test)])
                seconds = time.perf_counter() - start
                doc = read_json(folder / "sparse.json", "sparse export")
                size = sum(p.stat().st_size for p in folder.glob("sparse.*"))
                differ = int((predict_logits(load_sparse(folder), data.x_test).argmax(1) != reference).sum())
                steps = ", ".join(str(c["step_log2"]) for c in doc["choices"])
                selected = doc["quantized"]
                print(f"{name:<26}{margin:>8g}{steps:>16}{size:>8,}{teacher_bytes / size:>17.0f}"
                      f"{selected['ties_left_out']:>10}{selected['ties_changed']:>9}{differ:>13}{seconds:>10.1f}")


if __name__ == "__main__":
    main()

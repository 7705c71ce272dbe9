"""The MLflow pyfunc of a varstudent model, logged as *code* (models-from-code): nothing is pickled.

MLflow copies this file into the logged model and runs it at load time; `load_context` then reads the
safetensors weights + JSON spec that were logged as the artifact `model` (see varstudent.registry). The
model's name inside that folder (teacher, compact, ...) comes from the logged model_config.

Input: float32 images (N, C, H, W) in [0, 1], the way `prepare` scales data (JSON: {"inputs": [...]}).
Output: one row per image: `class`, its `probability`, and `probabilities` (softmax over every class).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class VarstudentPyfunc(PythonModel):
    # no type-hint validation wrapper (and no warning asking for hints): the logged signature checks the input
    _skip_type_hint_validation = True

    def load_context(self, context):  # no type hints: mlflow would read them as a schema
        from pathlib import Path

        from varstudent.artifacts import load_model

        name = (context.model_config or {}).get("name", "compact")
        self.net = load_model(Path(context.artifacts["model"]), name)
        self.input_shape = tuple(self.net.spec["input_shape"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        from varstudent.errors import DataError
        from varstudent.predict import class_table

        x = np.asarray(model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input,
                       dtype=np.float32)
        c, h, w = self.input_shape
        if x.ndim == 2 and x.shape[1] == c * h * w:  # flat rows, as a DataFrame or CSV would send them
            x = x.reshape(-1, c, h, w)
        if x.ndim == 3 and c == 1:
            x = x[:, None]
        if x.shape[1:] != (c, h, w):
            raise DataError(f"inputs of shape {x.shape} do not fit the model's input {c}x{h}x{w}")
        return class_table(self.net, torch.from_numpy(np.ascontiguousarray(x)))


mlflow.models.set_model(VarstudentPyfunc())

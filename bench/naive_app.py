"""The naive baseline the serving benchmark compares against. Benchmark-only code.

What a team would write first: one FastAPI process, synchronous endpoints, the model shared by
FastAPI's thread pool, pytorch-grad-cam constructed per request, no batching, no bounds.
Run: ``uvicorn bench.naive_app:app`` with NAIVE_ARCH / NAIVE_LAYER set (defaults resnet50/layer4).
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import timm
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image

ARCH = os.environ.get("NAIVE_ARCH", "resnet50")
LAYER = os.environ.get("NAIVE_LAYER", "layer4")

torch.manual_seed(0)
model = timm.create_model(ARCH, pretrained=False).eval()
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)
target_layer = dict(model.named_modules())[LAYER]
app = FastAPI()


def _load(data: bytes) -> tuple[Image.Image, torch.Tensor]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return image, transform(image).unsqueeze(0)


@app.get("/readyz")
def readyz() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/predict")
def predict_endpoint(image: UploadFile = File(...)) -> dict[str, object]:  # noqa: B008
    _, tensor = _load(image.file.read())
    with torch.no_grad():
        probabilities = torch.softmax(model(tensor), dim=-1)[0]
    top = probabilities.topk(5)
    return {
        "predictions": [
            {"index": int(i), "probability": float(p)}
            for p, i in zip(top.values, top.indices, strict=True)
        ]
    }


@app.post("/explain")
def explain_endpoint(image: UploadFile = File(...)) -> dict[str, object]:  # noqa: B008
    picture, tensor = _load(image.file.read())
    with GradCAM(model=model, target_layers=[target_layer]) as cam:
        grayscale = cam(input_tensor=tensor, targets=None)[0]
        target = int(cam.outputs.argmax(dim=-1)[0])
    rgb = np.asarray(picture.resize((grayscale.shape[1], grayscale.shape[0]))) / 255.0
    overlay = show_cam_on_image(rgb.astype(np.float32), grayscale, use_rgb=True)
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, "PNG")
    return {
        "target": target,
        "heatmap": grayscale.tolist(),
        "overlay": base64.b64encode(buffer.getvalue()).decode(),
    }

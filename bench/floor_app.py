"""The framework's floor for ``cpu_cost_bench.py``: a bare FastAPI endpoint on uvicorn that reads
the same multipart upload the service gets and answers small JSON. Benchmark-only code.

Run: ``uvicorn bench.floor_app:app --port 8100`` (uvloop and httptools, as the service runs).
"""

from __future__ import annotations

from fastapi import FastAPI, File, UploadFile

app = FastAPI()


@app.get("/readyz")
def readyz() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/upload")
async def upload(image: UploadFile = File(...)) -> dict[str, int]:  # noqa: B008
    data = await image.read()
    return {"bytes": len(data)}

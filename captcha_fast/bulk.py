"""Reading millions of image files on Ray Data: one recognizer per worker, (path, text, score, confidence) out.

    import ray
    from captcha_fast.bulk import read_files
    files = ray.data.read_binary_files("s3://bucket/captchas/", include_paths=True)   # or a local folder
    reads = read_files(files, model="model.pt", concurrency=4)    # 4 actors, each loads the model once
    reads.write_parquet("s3://bucket/reads/")                      # columns path, text, score, confidence, error

read_files is ds.map_batches(Reader, ...) with an actor pool (`concurrency` actors, `num_cpus` each):
Ray Data streams the files through them in batches of `batch_size`, so memory stays bounded
whatever the number of files. A file that is not a readable image does not stop the job: its row
has text "", score and confidence NaN and the reason in `error` ("" for the others). Needs the ray extra:
pip install "captcha_fast[ray]". The model file must be readable at the same path on every
worker (shared storage; or ship it with runtime_env={"working_dir": ...})."""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from captcha_fast import api, preprocess


class Reader:
    """A map_batches callable class: the recognizer is loaded once per actor.

    A batch is {"bytes": encoded images, "path": their paths} (ray.data.read_binary_files(...,
    include_paths=True)) or {"path": image paths} alone (e.g. ray.data.from_items([{"path": p}, ...]));
    the answer is {"path", "text", "score", "confidence", "error"}, one row per input row, in order.
    model, device: as captcha_fast.load (None: the shipped model); the other keyword arguments go
    to predict_batch (beam_width, and the length/charset constraints where predict_batch has them).
    Threads: predict_batch's choice, within the CPUs Ray gives the actor (its num_cpus)."""

    def __init__(self, model: Optional[str] = None, device: str = "cpu", max_pixels: Optional[int] = None,
                 **predict_kwargs: Any):
        self.model = api.load(model, device=device) if model else api.default_model(device=device)
        self.max_pixels = max_pixels
        self.predict_kwargs = predict_kwargs

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        sources = batch["bytes"] if "bytes" in batch else paths
        height, max_width = int(self.model.height), int(self.model.max_width)
        tensors, good, errors = [], [], [""] * len(paths)
        for i, (source, path) in enumerate(zip(sources, paths)):
            try:  # one image at a time, so that a bad file fails its row only
                t = preprocess.to_tensor(source, repr(path), self.max_pixels)
                preprocess.check_width(t.shape[-2], t.shape[-1], height, max_width, repr(path))
            except (ValueError, TypeError, OSError) as e:
                errors[i] = str(e)
                continue
            tensors.append(t)
            good.append(i)
        texts, scores, confidences = [""] * len(paths), np.full(len(paths), np.nan), np.full(len(paths), np.nan)
        if tensors:
            hyps = api.predict_batch(tensors, self.model, return_scores=True, **self.predict_kwargs)
            for i, hs in zip(good, hyps):
                if hs:  # none when no label meets the constraints
                    texts[i], scores[i], confidences[i] = hs[0].text, hs[0].score, hs[0].confidence
        return {"path": np.array(paths, dtype=object), "text": np.array(texts, dtype=object), "score": scores,
                "confidence": confidences, "error": np.array(errors, dtype=object)}


def read_files(dataset, model: Optional[str] = None, *, concurrency: int = 1, batch_size: int = 64,
               num_cpus: float = 1, **reader_kwargs: Any):
    """`dataset` (rows with "path" and optionally "bytes") read by an actor pool of `concurrency`
    Readers with `num_cpus` CPUs each: a ray.data.Dataset of (path, text, score, confidence, error), lazily."""
    return dataset.map_batches(Reader, fn_constructor_kwargs={"model": model, **reader_kwargs},
                               concurrency=concurrency, num_cpus=num_cpus, batch_size=batch_size,
                               batch_format="numpy")

"""captcha_fast.bulk on a local Ray instance: Ray Data reads files through an actor pool and gives
predict_batch's reads, row for row, with bad files reported rather than fatal."""
import math

import pytest

from captcha_fast import api
from captcha_fast.synth import render, sample_rng

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install '.[ray]'")
pytest.importorskip("ray.data")

TEXTS = ("3a7f", "0b1c", "c4d5e6", "ffff", "12ab", "9e", "d00d")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 actors + 1 for the read tasks
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Seven captchas (PNG) and one file that is not an image."""
    folder = tmp_path_factory.mktemp("bulk")
    for i, text in enumerate(TEXTS):
        render(text, sample_rng(9, i), height=50).save(folder / f"{i}.png")
    (folder / "notes.png").write_text("not an image")
    return folder


def _check(rows, folder, tiny_model_path):
    by_path = {r["path"]: r for r in rows}
    images = sorted(str(p) for p in folder.glob("[0-9].png"))
    assert sorted(by_path) == sorted(images + [str(folder / "notes.png")])
    expected = api.predict_batch(images, tiny_model_path, return_scores=True)
    for path, hyps in zip(images, expected):
        row = by_path[path]
        assert row["error"] == "" and row["text"] == hyps[0].text
        assert row["score"] == pytest.approx(hyps[0].score, rel=1e-4, abs=1e-4)
        assert 0 <= row["confidence"] <= 1 and row["confidence"] == pytest.approx(hyps[0].confidence, abs=1e-4)
    bad = by_path[str(folder / "notes.png")]
    assert bad["text"] == "" and math.isnan(bad["score"]) and math.isnan(bad["confidence"]) \
        and "notes.png" in bad["error"] \
        and "not a readable image" in bad["error"]


def test_binary_files_through_an_actor_pool(local_ray, folder, tiny_model_path):
    from captcha_fast.bulk import read_files

    files = ray.data.read_binary_files(str(folder), include_paths=True)
    reads = read_files(files, model=str(tiny_model_path), concurrency=2, batch_size=3)
    _check(reads.take_all(), folder, tiny_model_path)


def test_paths_only_with_map_batches_by_hand(local_ray, folder, tiny_model_path):
    from captcha_fast.bulk import Reader

    paths = ray.data.from_items([{"path": str(p)} for p in sorted(folder.iterdir())])
    reads = paths.map_batches(Reader, fn_constructor_kwargs={"model": str(tiny_model_path)}, concurrency=1,
                              batch_size=4, batch_format="numpy")
    _check(reads.take_all(), folder, tiny_model_path)

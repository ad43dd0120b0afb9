"""The real service: `resforge serve` in a subprocess (uvicorn on a free 127.0.0.1 port),
talked to over HTTP: predictions, model info, health, the page, limits and JSON errors."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from deploy_helpers import digit_images, png_bytes, running_server, torch_one_thread, trained_run  # noqa: F401

pytest.importorskip("fastapi", reason="the service needs fastapi (pip install resforge[serve])")
pytest.importorskip("uvicorn", reason="the service needs uvicorn (pip install resforge[serve])")
pytest.importorskip("multipart", reason="the service needs python-multipart (pip install resforge[serve])")
requests = pytest.importorskip("requests", reason="the tests talk HTTP with requests")

MAX_UPLOAD = 300_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def server(run):
    with running_server(run, "--max-upload-mb", str(MAX_UPLOAD / 1e6), "--max-pixels", str(MAX_PIXELS),
                        "--max-files", "8", "--max-batch", "16", "--max-wait-ms", "40", "--threads", "1") as url:
        yield url


@pytest.fixture(scope="module")
def digits(run):
    return digit_images(run, 8)


def _local_predictions(run, digits) -> list[str]:
    """What `resforge predict` says for the same files: the service must agree."""
    import resforge
    folder = run.parent / "digit-files"
    folder.mkdir(exist_ok=True)
    for name, data, _ in digits:
        (folder / name).write_bytes(data)
    rows = resforge.predict(run, [folder / name for name, _, _ in digits], topk=1, device="cpu")
    return [r["topk"][0]["label"] for r in rows]


def test_predict_one_and_many(server, run, digits):
    r = requests.post(f"{server}/v1/predict?topk=3", files={"file": ("a.png", digits[0][1], "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "resnet20" and len(body["predictions"]) == 1
    top = body["predictions"][0]["topk"]
    assert [len(top), body["predictions"][0]["filename"]] == [3, "a.png"]
    assert top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"] > 0

    files = [("file", (name, data, "image/png")) for name, data, _ in digits]
    r = requests.post(f"{server}/v1/predict?topk=1", files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [name for name, _, _ in digits]
    assert [p["topk"][0]["label"] for p in preds] == _local_predictions(run, digits)


def test_answers_carry_the_ood_flag_that_predict_gives(server, run, digits):
    """The run's sidecar carries an OOD threshold (fitted on val): each answer says how familiar
    the image is, as `resforge predict --ood` does."""
    import resforge
    _local_predictions(run, digits)                          # writes the files predict reads
    local = resforge.predict(run, [run.parent / "digit-files" / name for name, _, _ in digits], ood=True,
                             device="cpu")
    files = [("file", (name, data, "image/png")) for name, data, _ in digits]
    preds = requests.post(f"{server}/v1/predict?topk=1", files=files).json()["predictions"]
    assert all(isinstance(p["ood"], bool) for p in preds)
    assert [p["ood"] for p in preds] == [r["ood"] for r in local]
    assert [p["ood_score"] for p in preds] == pytest.approx([r["ood_score"] for r in local], abs=1e-4)
    schema = requests.get(f"{server}/openapi.json").json()["paths"]["/v1/predict"]["post"]["responses"]["200"]
    item = schema["content"]["application/json"]["schema"]["properties"]["predictions"]["items"]
    assert {"ood_score", "ood"} <= set(item["properties"])


def test_model_info_health_and_page(server, run):
    info = requests.get(f"{server}/v1/model").json()
    sidecar = json.loads((run / "weights" / "best.json").read_text())
    assert info["architecture"] == "resnet20" and info["classes"] == sidecar["class_names"]
    assert info["input_size"] == [1, 8, 8] and info["metrics"] == sidecar["metrics"]
    assert info["ood"] == sidecar["ood"] and info["ood"]["score"] == "msp"
    assert info["version"]["resforge"] and info["backend"] == "torch"
    assert info["limits"]["max_upload_bytes"] == MAX_UPLOAD and info["limits"]["max_pixels"] == MAX_PIXELS
    health = requests.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and "batching" in health
    page = requests.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "/v1/predict" in page.text


def test_concurrent_requests_are_batched(server, digits):
    before = requests.get(f"{server}/healthz").json()["batching"]

    def one(i):
        name, data, _ = digits[i % len(digits)]
        return requests.post(f"{server}/v1/predict", files={"file": (name, data)}).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(48)))
    assert codes == [200] * 48
    after = requests.get(f"{server}/healthz").json()["batching"]
    assert after["images"] - before["images"] == 48
    assert after["batches"] - before["batches"] < 48 and after["largest_batch"] > 1   # shared model calls


def _error(r, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["status"] == status and all(w in body["error"] for w in words), body
    return body


def test_bad_requests_get_json_4xx(server):
    url = f"{server}/v1/predict"
    png = png_bytes()
    # content sniffing: name and declared type are ignored, the bytes decide
    assert requests.post(url, files={"file": ("x.jpg", png, "image/jpeg")}).status_code == 200
    _error(requests.post(url, files={"file": ("cat.png", b"MZ\x90\x00 an executable", "image/png")}),
           415, "'cat.png'", "not a supported image")
    _error(requests.post(url, files={"file": ("t.png", b"\x89PNG\r\n\x1a\n truncated")}), 422, "'t.png'", "PNG")
    _error(requests.post(url, files={"file": ("e.png", b"")}), 400, "empty")
    _error(requests.post(url, json={"image": "x"}), 415, "multipart/form-data")
    _error(requests.post(url, data={"note": "no file here"}, files={"k": (None, "v")}), 400, "no image file")
    _error(requests.post(url, data=b"--b\r\nbroken", headers={"content-type": "multipart/form-data"}),
           400, "multipart")
    _error(requests.post(url + "?topk=0", files={"file": ("a.png", png)}), 422, "topk", "between 1 and 10")
    _error(requests.post(url + "?topk=many", files={"file": ("a.png", png)}), 422, "topk")
    _error(requests.get(f"{server}/v2/nothing"), 404, "no route")
    _error(requests.put(url), 405, "PUT")


def test_size_pixel_and_count_limits(server):
    url = f"{server}/v1/predict"
    bomb = png_bytes(0, (1200, 1000))                 # ~4 kB of PNG, 1.2 Mpixel once decoded
    assert len(bomb) < 20_000
    _error(requests.post(url, files={"file": ("bomb.png", bomb)}), 413, "1200x1000", "pixels")
    big = png_bytes(0, (2, 2), fmt="BMP") + b"\0" * (MAX_UPLOAD + 10)
    _error(requests.post(url, files={"file": ("big.bmp", big)}), 413, "upload limit")

    def chunks(data: bytes):                          # chunked transfer: no Content-Length to check
        for i in range(0, len(data), 16384):
            yield data[i:i + 16384]
    body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.bmp\"\r\n\r\n" + big + b"\r\n--b--\r\n"
    _error(requests.post(url, data=chunks(body), headers={"content-type": "multipart/form-data; boundary=b"}),
           413, "upload limit", "received")
    files = [("file", (f"{i}.png", png_bytes(i))) for i in range(9)]
    _error(requests.post(url, files=files), 413, "at most 8 files")
    assert requests.get(f"{server}/healthz").json()["status"] == "ok"    # still serving


def test_onnx_export_serves_the_same_answers(run, digits):
    pytest.importorskip("onnxruntime", reason="the onnx backend needs onnxruntime")
    from resforge.export import export

    artifact = export(run, "onnx", run.parent / "served.onnx").path
    with running_server(artifact, "--max-wait-ms", "0", "--threads", "1") as url:
        info = requests.get(f"{url}/v1/model").json()
        assert info["backend"] == "onnx" and info["architecture"] == "resnet20" and info["input_size"] == [1, 8, 8]
        files = [("file", (name, data)) for name, data, _ in digits]
        preds = requests.post(f"{url}/v1/predict?topk=1", files=files).json()["predictions"]
    assert [p["topk"][0]["label"] for p in preds] == _local_predictions(run, digits)

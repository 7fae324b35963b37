import os
from pathlib import Path

import urllib.request
from dataclasses import dataclass

import pytest

ROOT = Path(__file__).resolve().parent.parent
_shared_tiktoken = ROOT.parent / "shared" / "tiktoken"
if (_shared_tiktoken / "o200k_base.tiktoken").exists():
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_shared_tiktoken))
# No GPU here: the Triton kernels run under the interpreter, which is chosen when
# kernels/ is first imported, so it is set before any test module imports them.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default tiny random checkpoint (2 layers, 8 experts, top-2), HF layout."""
    from ossbatch.engine.tiny_model import TINY, write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-model"), TINY, seed=0)


# A real S3 endpoint for pipeline and flow tests: moto's server on loopback,
# reached the way users configure S3 (AWS_* variables and s3fs).
BUCKET = "ossbatch-test"


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class S3:
    fs: object  # s3fs.S3FileSystem
    bucket: str
    endpoint: str

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> str:
        self.fs.pipe_file(f"{self.bucket}/{key}", data)
        return self.uri(key)


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """An empty bucket on the moto server, reachable the way users configure S3: AWS_* variables."""
    import s3fs

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")).close()
    # s3fs caches filesystems (and their listings) across calls: start every test from a clean one.
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield S3(fs=fs, bucket=BUCKET, endpoint=moto_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()

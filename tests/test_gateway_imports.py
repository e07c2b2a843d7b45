import subprocess
import sys

from tests.conftest import ROOT

HEAVY_MODULES = ["torch", "transformers", "safetensors.torch", "peft", "accelerate"]


def test_gateway_app_builds_without_importing_torch_or_transformers() -> None:
    probe = (
        "import sys\n"
        "from app.main import create_app\n"
        "create_app()\n"
        f"print([name for name in {HEAVY_MODULES!r} if name in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_import_probe_would_notice_torch() -> None:
    probe = "import sys\nimport workers.resident_models\nimport torch\nprint('torch' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_an_s3_store_imports_boto3_only_when_it_first_talks_to_the_bucket() -> None:
    probe = (
        "import sys\n"
        "from app.settings import Settings\n"
        "from app.storage import open_store\n"
        "store = open_store(Settings(artifact_store='s3://bucket/prefix', s3_endpoint_url='http://127.0.0.1:9'))\n"
        "print('boto3' in sys.modules, type(store).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False BucketStore"

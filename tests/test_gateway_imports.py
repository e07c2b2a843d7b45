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
    probe = "import sys\nimport workers.models\nimport torch\nprint('torch' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"

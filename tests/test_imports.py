import subprocess
import sys

PURE = ["raydistill.diffusion", "raydistill.models", "raydistill.methods"]


def test_pure_layers_do_not_import_ray_or_deepspeed():
    code = (
        "import importlib, importlib.util, sys\n"
        f"for name in {PURE!r}:\n"
        "    if importlib.util.find_spec(name) is not None:\n"
        "        importlib.import_module(name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed'))\n"
        "assert not heavy, heavy\n"
        "assert 'raydistill.diffusion' in sys.modules and 'raydistill.models' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""The wheel built from the tree holds the package and nothing else: featstore/, pipelines/ and
trainers/ under the `featstore` namespace, cli.py as `featstore.command.cli` (and no other file of
the repository root, even one added later), the configs and the eval data as package data.  The
installed wheel runs `--config sharelock` by name."""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE = ["pyproject.toml", "README.md", "cli.py", "featstore", "pipelines", "trainers", "configs"]


def test_wheel_holds_only_the_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in TREE:  # a copy, so the build writes nothing into the repository
        (shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy2)(
            os.path.join(ROOT, name), src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                    if os.path.isdir(os.path.join(ROOT, name)) else {}))
    (src / "scratch.py").write_text("print('a script someone left at the root')\n")  # never packaged
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("featstore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    files = [n for n in names if ".dist-info/" not in n]
    assert {n.split("/")[0] for n in files} == {"featstore"}
    assert {n.split("/")[1] for n in files if n.count("/") > 1} == {"command", "configs", "core", "models", "pipelines", "read", "tools", "trainers"}
    assert [n for n in files if n.startswith("featstore/command/")] == ["featstore/command/cli.py"]
    assert {"featstore/configs/sharelock.yaml", "featstore/configs/uta.yaml", "featstore/configs/demo.yaml",
            "featstore/trainers/data/classnames.json", "featstore/trainers/data/templates.json"} <= set(files)
    assert not [n for n in files if "scratch" in n or "tests/" in n or "benchmarks/" in n or "__pycache__" in n]
    sources = {os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/")
               for top in ("featstore", "pipelines", "trainers") for d, _, fs in os.walk(src / top) for f in fs
               if f.endswith(".py") and "command" not in d}
    as_installed = {("featstore/" + s if not s.startswith("featstore/") else s) for s in sources}
    assert as_installed <= set(files)  # every module of the three folders is in it

    target = tmp_path / "site"  # the wheel on its own, beside the dependencies already installed
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import featstore, featstore.command.cli as cli\n"
            "from featstore.trainers.config import config_path\nfrom featstore.trainers.sharelock.config import load_config\n"
            "print(featstore.__file__, cli.__file__, config_path('sharelock'), load_config('sharelock').val_rows)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)}).stdout.split()
    assert all(p.startswith(str(target)) for p in out[:3]) and out[3] == "50000", out

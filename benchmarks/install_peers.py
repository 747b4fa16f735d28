"""Install bench_store's peers into this environment without changing any package the project has.

    .venv/bin/python benchmarks/install_peers.py          (what `make bench` runs first)
    .venv/bin/python benchmarks/install_peers.py --check  only check the peers import and nothing moved

Why not `pip install -e ".[bench]"` with the peers in the extra: mosaicml-streaming 0.13 pins
numpy<2.2 and transformers<5, so pip would downgrade the project's numpy 2.4 / transformers 5;
and both litdata and mosaicml-streaming require torchvision, whose wheels are CUDA builds that
break this CPU torch.  So, in three steps:

1. every distribution installed now is written to a constraints file at its current version, and
   the `bench` extra (Lance, the S3 server, and what litdata and mosaic streaming import) is
   installed under it: a requirement that would move an installed package fails the install
   instead of changing it;
2. litdata and mosaicml-streaming themselves are installed with `--no-deps` at pinned versions
   (`NO_DEPS`): the parts bench_store uses run on this numpy / transformers (its contenders
   import mosaic's `streaming.base` without the package `__init__`, which imports torchvision);
3. check: every distribution of step 1's snapshot is still at its version, a fresh interpreter
   imports numpy, transformers, torch and featstore at those versions, and the peers import.
   Anything else exits 1 with one line saying what changed.

Only the standard library is used (pip runs as `python -m pip`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_DEPS = {"litdata": "0.2.76", "mosaicml-streaming": "0.13.0"}
KEY_IMPORTS = {"numpy": "numpy", "transformers": "transformers", "torch": "torch", "featstore": "featstore"}  # dist: module
PEER_IMPORTS = ("import litdata", "import lance", "import boto3, moto, s3fs",
                "sys.path.insert(0, 'benchmarks'); from contenders.mosaic_mds import import_streaming; import_streaming()")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def snapshot() -> dict[str, str]:
    """{distribution: version} of everything installed in this interpreter's environment."""
    out = {}
    for d in metadata.distributions():
        name = d.metadata["Name"]
        if name:
            out[canonical(name)] = d.version
    return out


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What moved between two snapshots: a package removed or at another version (added ones are fine)."""
    out = []
    for name, version in sorted(before.items()):
        now = after.get(name)
        if now is None:
            out.append(f"{name} {version} was removed")
        elif now != version:
            out.append(f"{name} {version} -> {now}")
    return out


def imported_versions(python: str = sys.executable) -> dict[str, str]:
    """The versions a fresh interpreter imports (what the project's code runs with): each module's
    `__version__` (featstore: its metadata)."""
    code = ("import json, importlib.metadata as m\n"
            + "".join(f"import {mod}\n" for mod in KEY_IMPORTS.values())
            + "print(json.dumps({'numpy': numpy.__version__, 'transformers': transformers.__version__, "
              "'torch': torch.__version__, 'featstore': m.version('featstore')}))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"install_peers: a fresh interpreter cannot import {', '.join(KEY_IMPORTS)}: "
                         f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def check(before: dict[str, str]) -> list[str]:
    """Every problem after installing, as one line each (empty: all is well)."""
    problems = changes(before, snapshot())
    imported = imported_versions()
    for name, version in imported.items():
        if name in before and before[name] != version:
            problems.append(f"import {name} gives {version}, not the project's {before[name]}")
    for stmt in PEER_IMPORTS:
        r = subprocess.run([sys.executable, "-c", f"import sys; {stmt}"], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            problems.append(f"`{stmt}` fails: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return problems


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"install_peers: `pip {' '.join(cmd[4:])}` failed; nothing the project had was changed "
                         "(a requirement that would move one of its packages fails instead)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="install nothing: check the peers import")
    args = ap.parse_args()
    before = snapshot()
    if not args.check:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="project-pins-", delete=False) as f:
            # featstore itself is installed editable from this checkout: `-e .[bench]` reinstalls it in place
            f.write("".join(f"{n}=={v}\n" for n, v in sorted(before.items()) if n != "featstore"))
        pip("-c", f.name, "-e", f"{ROOT}[bench]")
        pip("--no-deps", *(f"{n}=={v}" for n, v in NO_DEPS.items()))
        Path(f.name).unlink()
    problems = check(before)
    if problems:
        print("install_peers: " + "; ".join(problems), file=sys.stderr)
        return 1
    have = snapshot()
    print("install_peers: the project's packages are unchanged ("
          + ", ".join(f"{n} {v}" for n, v in imported_versions().items()) + "); peers: "
          + ", ".join(f"{n} {have.get(n)}" for n in (*NO_DEPS, "pylance", "moto")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The offline end-to-end demo (`make demo`): real images, real models, the real commands.

1. scikit-learn's handwritten digits (1,797 real 8x8 scans) become PNGs with varied captions,
   served on 127.0.0.1 and downloaded with `featstore download` (img2dataset) into shards.
2. `featstore extract`: EfficientNet-Lite0 image features and MiniLM caption features.
3. `featstore train-head --config demo` (configs/demo.yaml: a ShareLock head, in seconds).
4. `featstore eval`: zero-shot digit classification on held-out images, with prompts worded
   unlike any training caption, next to chance.

Every step prints the command it runs, so you can run them yourself on your own data.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = [
    "a handwritten digit {w}",
    "the number {d} written by hand",
    "a scanned image of a hand-drawn {d}",
    "handwriting showing the numeral {w}",
    "a small pixelated {w}",
    "someone wrote the digit {d} with a pen",
    "a low resolution scan of the number {w}",
    "{w}, as written on a form",
]
# worded unlike any training caption: no "digit", "number", "numeral", "hand" ...
EVAL_TEMPLATES = ["a grey picture of a {c}.", "an image that shows a {c}.", "{c}"]


def make_digits(web_dir: str) -> tuple[str, str, str]:
    """Write digits as PNGs under web_dir/img and the url list; returns (urls parquet, classes file, templates file)."""
    import pandas as pd
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    os.makedirs(os.path.join(web_dir, "img"), exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        ink = 255 - (pixels / 16.0 * 255).astype(np.uint8)  # dark ink on white paper
        img = Image.fromarray(ink).resize((64, 64), Image.BICUBIC)
        name = f"img/{i:05d}.png"
        img.save(os.path.join(web_dir, name))
        caption = CAPTIONS[rng.integers(len(CAPTIONS))].format(w=WORDS[label], d=int(label))
        rows.append({"file": name, "caption": caption, "uid": f"digits-{i:05d}", "label": int(label)})
    urls = os.path.join(web_dir, "..", "urls.parquet")
    pd.DataFrame(rows).to_parquet(urls)
    classes = os.path.join(web_dir, "..", "classes.txt")
    with open(classes, "w") as f:
        f.write("\n".join(WORDS) + "\n")
    templates = os.path.join(web_dir, "..", "templates.txt")
    with open(templates, "w") as f:
        f.write("\n".join(EVAL_TEMPLATES) + "\n")
    return os.path.abspath(urls), os.path.abspath(classes), os.path.abspath(templates)


def serve(directory: str):
    handler = functools.partial(type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}),
                                directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def run(*args: str, capture: bool = False) -> str:
    print("\n$ featstore " + " ".join(args), flush=True)
    out = subprocess.run([FEATSTORE, *args], check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return out.stdout or ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "demo_out"))
    ap.add_argument("--fresh", action="store_true", help="Delete --out first (otherwise every step resumes).")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.time()
    out = os.path.abspath(args.out)
    web = os.path.join(out, "web")
    urls, classes, templates = make_digits(web)
    import pandas as pd

    server, base = serve(web)
    try:
        table = pd.read_parquet(urls)
        table["url"] = base + "/" + table["file"]
        table.to_parquet(urls)
        print(f"{len(table)} digits written as PNGs, served at {base}")
        run("download", urls, "--out", f"{out}/shards", "--uid-col", "uid", "--keep-col", "label", "--image-size", "64", "--processes", "1", "--threads", "8")
    finally:
        server.shutdown()
    store = f"{out}/digits.zarr"
    common = ["--store", store, "--source", f"{out}/shards", "--rows-per-shard", "256", "--label-column", "label"]
    run("extract", *common, "--backbone", "efficientnet-lite0", "--batch-size", "64", "--num-workers", "1")
    run("extract", *common, "--backbone", "minilm", "--field", "caption", "--batch-size", "128")
    run("inspect", "--store", store, "--plot", f"{out}/inspect.png")
    shutil.rmtree(f"{out}/run", ignore_errors=True)  # the head trains in seconds: always a fresh run
    run("train-head", "--store", store, "--image", "efficientnet-lite0", "--text", "minilm", "--out", f"{out}/run",
        "--config", "demo")
    result = json.loads(run("eval", "--checkpoint", f"{out}/run", "--store", store, "--classes", classes,
                            "--templates", templates, "--split", "--json", capture=True))
    zs = result["zero_shot"]
    print("\n" + "=" * 72)
    print(f"zero-shot digit classification on {zs['rows']} held-out images, prompts like {EVAL_TEMPLATES[0]!r}:")
    print(f"  top-1 {100 * zs['top1']:.1f}%   (chance {100 / len(WORDS):.1f}%)   top-5 {100 * zs['top5']:.1f}%")
    print(f"  training curves: {out}/run/curves.png   store plot: {out}/inspect.png")
    print(f"  demo took {time.time() - t0:.0f}s")
    print("=" * 72)
    return 0


if __name__ == "__main__":
    sys.exit(main())

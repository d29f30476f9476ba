"""Execute every analysis notebook against a sweep directory; fail on the first error.

    python notebooks/execute.py runs/demo [--out runs/notebooks]

CI runs this on the demo sweep's output (``make notebooks``), so the notebooks never rot.
Executed copies (with their outputs and figures) go to --out; the committed notebooks
stay output-free.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir")
    p.add_argument("--out", default="runs/notebooks")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    a = p.parse_args(argv)
    if not os.path.exists(os.path.join(a.sweep_dir, "sweep.json")):
        print(f"{a.sweep_dir}: not a sweep directory (run `make demo` first)", file=sys.stderr)
        return 2
    os.environ["PTJAX_SWEEP_DIR"] = os.path.abspath(a.sweep_dir)
    os.makedirs(a.out, exist_ok=True)
    failed = []
    for path in sorted(glob.glob(os.path.join(HERE, "*.ipynb"))):
        book = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        try:
            NotebookClient(book, timeout=a.timeout, kernel_name="python3",
                           resources={"metadata": {"path": HERE}}).execute()
            status = "ok"
        except CellExecutionError as e:
            failed.append(os.path.basename(path))
            status = "FAILED\n" + str(e)[-2000:]
        nbformat.write(book, os.path.join(a.out, os.path.basename(path)))
        print(f"{os.path.basename(path):18s} {time.perf_counter() - t0:5.1f}s  {status}",
              flush=True)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"executed notebooks written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

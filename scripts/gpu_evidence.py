"""Entry of the GPU evidence run (see scripts/gpu_evidence.sh and mmfast.bench.evidence).

Runs mmfast from this source tree with no install and no PYTHONPATH: the device machine
has a bare copy of the repository and a system Python with torch. pyproject maps three
folders at the top of the repository into the package (kernels/ -> mmfast.kernels,
bench/ -> mmfast.bench, csrc/ -> mmfast.csrc); an installed package gets that from
setuptools, a bare tree from the finder below.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"mmfast.kernels": "kernels", "mmfast.bench": "bench", "mmfast.csrc": "csrc"}


class TreeFinder(importlib.abc.MetaPathFinder):
    """Finds the three mapped packages in this tree (their submodules are then found
    through the package's own __path__)."""

    def find_spec(self, fullname, path=None, target=None):
        folder = MAPPED.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, ROOT / folder / "__init__.py", submodule_search_locations=[str(ROOT / folder)])


def use_tree() -> None:
    """Import mmfast from this tree, whatever is installed."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    script_dir = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p != script_dir]  # nothing here shadows a module
    if not any(isinstance(f, TreeFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TreeFinder())


def main(argv: list[str]) -> int:
    use_tree()
    if argv[:1] == ["--worker"]:
        from mmfast.bench.evidence_worker import main as worker_main

        return worker_main(argv[1])
    from mmfast.bench.evidence import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

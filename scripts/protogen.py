"""Regenerate certbroker/v1 from proto/ (the one command), or check it has not drifted.

python scripts/protogen.py          # write generated code
python scripts/protogen.py --check  # exit 1 if committed code differs from a fresh generation
"""

from __future__ import annotations

import filecmp
import os
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
PACKAGE = Path("certbroker") / "v1"


def generate(out: Path) -> None:
    # The mypy plugins are console scripts installed beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    sources = sorted(str(p.relative_to(PROTO)) for p in (PROTO / PACKAGE).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out / PACKAGE / "__init__.py").write_text(
        '"""Generated from proto/certbroker/v1 by scripts/protogen.py. Do not edit."""\n'
    )


def main() -> int:
    if "--check" not in sys.argv[1:]:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh, committed = Path(tmp) / PACKAGE, ROOT / PACKAGE
        names = sorted(
            {p.name for p in fresh.iterdir()} | {p.name for p in committed.glob("*.py*")}
        )
        drift = [
            n
            for n in names
            if not (fresh / n).exists()
            or not (committed / n).exists()
            or not filecmp.cmp(fresh / n, committed / n, shallow=False)
        ]
    if drift:
        print("generated code drifted from proto/: " + ", ".join(drift) + " (run `make proto`)")
        return 1
    print("generated code matches proto/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

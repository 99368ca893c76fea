"""Rewrite GOLDEN in tests/train/test_golden_losses.py from a fresh run (the only way to change those numbers).

    .venv/bin/python scripts/regenerate_golden_losses.py            # print the losses, change nothing
    .venv/bin/python scripts/regenerate_golden_losses.py --write    # and write them into the test

Needs ../shared/assets (stories260K and the TinyStories sample). Change the golden numbers only when a
change to fine-tuning is meant to change them, and say why in the commit.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = REPO / "tests" / "train" / "test_golden_losses.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write the new numbers into the test file")
    args = parser.parse_args()
    sys.path[:0] = [str(REPO / "tests"), str(TEST.parent)]
    import test_golden_losses as golden

    import conftest
    from ropekit.apply.llama2c import convert

    assets = conftest.SHARED_ASSETS
    with tempfile.TemporaryDirectory() as tmp:
        model = convert(assets / "stories260K/stories260K.bin", assets / "stories260K/tok512.bin", Path(tmp) / "m")
        text = assets / "text/tinystories/tinystories_val_head.txt"
        results = {s: golden.golden_losses(s, Path(tmp) / s, model, text) for s in golden.SETTINGS}
    block = "GOLDEN = {\n" + "".join(f"    {s!r}: {losses!r},\n" for s, losses in results.items()) + "}"
    print(block.replace("'", '"'))
    if args.write:
        source = TEST.read_text()
        TEST.write_text(re.sub(r"GOLDEN = \{\n.*?\n\}", block.replace("'", '"'), source, count=1, flags=re.S))
        print(f"wrote {TEST.relative_to(REPO)}")


if __name__ == "__main__":
    main()

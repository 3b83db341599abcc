"""Output directories (issue 27): prep and export write only into a new or empty
directory or one they wrote before; a foreign one is refused naming it, unless --force."""

import json

import pytest

from cope_megatron.cli import main
from cope_megatron.data.prep.prep import FINGERPRINT, prepare
from cope_megatron.output_dir import ForeignDirectoryError, check_output_dir
from tests.helpers import small_data

MARKERS = ("ours.json",)


def test_new_empty_and_our_directories_are_accepted_others_refused(tmp_path):
    check_output_dir(tmp_path / "new", MARKERS, "thing")
    check_output_dir(tmp_path, MARKERS, "thing")
    (tmp_path / "ours.json").write_text("{}")
    (tmp_path / "model.safetensors").write_text("stale")
    check_output_dir(tmp_path, MARKERS, "thing")
    (tmp_path / "ours.json").unlink()
    with pytest.raises(ForeignDirectoryError, match=rf"^{tmp_path} is not empty and is not a "
                                                    r"thing of ours \(no ours\.json\).*--force"):
        check_output_dir(tmp_path, MARKERS, "thing")
    check_output_dir(tmp_path, MARKERS, "thing", force=True)
    with pytest.raises(ForeignDirectoryError, match="model.safetensors is a file"):
        check_output_dir(tmp_path / "model.safetensors", MARKERS, "thing")


def test_prep_refuses_a_foreign_directory_unless_forced(prepared, tmp_path):
    shards, _, corpus = prepared
    out = tmp_path / "p"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's")
    data = small_data(corpus.parent, shards=str(out), prep_workers=1,
                      tokenizer=str(shards / "tokenizer.model"))
    with pytest.raises(ForeignDirectoryError, match=f"{out} is not empty"):
        prepare(data, seq_len=32, seed=7, progress=False)
    assert not (out / FINGERPRINT).exists()
    manifest = prepare(data, seq_len=32, seed=7, progress=False, force=True)
    assert manifest["splits"]["train"]["samples"]
    # Now ours: a rerun (or a resume after a crash) goes on without --force.
    assert prepare(data, seq_len=32, seed=7, progress=False) == manifest


def test_cli_prep_names_the_directory_in_one_line(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "in.txt").write_text("text\n")
    code = main(["prep", f"data.shards={tmp_path / 'out'}", f"data.corpus=[{tmp_path}/in.txt]",
                 "logging.progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {tmp_path / 'out'} is not empty")
    assert "\n" not in err


def fake_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run:\n  dir: nowhere\n")
    return run


def test_export_refuses_a_foreign_directory_unless_forced(tmp_path, capsys):
    run, out = fake_run(tmp_path), tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"stale weights")
    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out} is not empty and is not a Hugging Face export")
    assert "--force" in err and "\n" not in err
    # --force passes the check: what fails next is the (fake) run itself.
    assert main(["export", "--force", str(run), str(out)]) == 2
    assert "is not empty" not in capsys.readouterr().err


def test_export_goes_into_an_earlier_export(tmp_path, capsys):
    run, out = fake_run(tmp_path), tmp_path / "hf"
    out.mkdir()
    (out / "cope_megatron.json").write_text(json.dumps({"run_dir": str(run)}))
    (out / "model.safetensors").write_bytes(b"our older weights")
    assert main(["export", str(run), str(out)]) == 2  # the fake run fails later
    assert "is not empty" not in capsys.readouterr().err

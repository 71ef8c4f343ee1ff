"""``python -m lrm_train.data.prepare``: help, config errors and write failures, each one line and exit code 2."""

import errno
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lrm_train.config_compose import CONFIG_DIR
from lrm_train.data import prepare as prepare_module
from lrm_train.data.prepare import main


def small_run(corpus_dir, out_root) -> list[str]:
    return [
        "data.name=local",
        f"data.source={corpus_dir}",
        f"data.out_root={out_root}",
        "data.vocab_size=300",
        "data.num_proc=1",
    ]


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_help_says_what_prepare_does_and_lists_only_the_data_group(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m lrm_train.data.prepare")
    assert "trains a byte-level BPE tokenizer" in text
    for option in sorted(path.stem for path in (CONFIG_DIR / "data").glob("*.yaml")):
        assert f"data={option}" in text
    for key in ("data.source", "data.vocab_size", "data.out_root", "data.num_proc", "data.tokenizer"):
        assert key in text
    assert not re.search(r"\b(model|optim|lrm|schedule|dist)\b", text)  # the trainer's groups are not prepare's


@pytest.mark.parametrize(
    "override, message",
    [
        ("+data.max_stepz=1", "unknown config key 'data.max_stepz' (check the spelling; --help lists the keys)"),
        ("+max_stepz=1", "unknown config key 'max_stepz' (check the spelling; --help lists the keys)"),
        ("data.vocab_sise=5", "unknown config key 'data.vocab_sise' (check the spelling; --help lists the keys)"),
        ("data=nope", "In 'prepare': Could not find 'data/nope' (options: local_text, shakespeare)"),
        ("data.vocab_size=many", "data.vocab_size: Value 'many' of type 'str' could not be converted to Integer"),
        ("data.vocab_size=null", "data.vocab_size: field 'data.vocab_size' is not Optional"),
        ("data=local_text", "data.source is empty: set it to a file, a folder, shakespeare or hf:NAME"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 must be in (0, 1)"),
    ],
)
def test_config_errors_are_one_line_before_any_work(tmp_path, capsys, override, message):
    assert main([f"data.out_root={tmp_path / 'out'}", override]) == 2
    captured = capsys.readouterr()
    assert error_lines(captured.err) == [f"error: config: {message}"] and not captured.out
    assert not (tmp_path / "out").exists()


def test_an_unknown_option_is_refused(capsys):
    assert main(["--overwrite"]) == 2
    assert error_lines(capsys.readouterr().err) == ["error: unknown option '--overwrite' (see --help)"]


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_no_temporary(tmp_path, corpus_dir, capsys, monkeypatch):
    def disk_full(self, tokens):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepare_module._ShardWriter, "write", disk_full)
    out_root = tmp_path / "out"
    assert main(small_run(corpus_dir, out_root)) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert re.fullmatch(
        rf"error: cannot write {re.escape(str(out_root))}/local-[0-9a-f]{{16}}: No space left on device", line
    )
    assert not list(out_root.iterdir())


def test_leftover_temporaries_of_dead_prepares_are_removed_at_the_next_start(tmp_path, corpus_dir, caplog):
    out_root = tmp_path / "out"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(finished.stdout), socket.gethostname()
    dead = out_root / f".tmp-local-0123456789abcdef@{host}-{dead_pid}-0badf00d"
    live = out_root / f".tmp-local-fedcba9876543210@{host}-{os.getpid()}-0badf00d"
    for leftover in (dead, live):
        leftover.mkdir(parents=True)
        (leftover / "train_00000.bin").write_bytes(b"\0" * 10)
    with caplog.at_level(logging.INFO):
        assert main(small_run(corpus_dir, out_root)) == 0
    assert not dead.exists() and live.exists()  # a live writer's temporary is its own business
    assert f"removed {dead}, left by an interrupted prepare" in caplog.messages
    assert len(list(out_root.glob("local-*/manifest.json"))) == 1


@pytest.mark.multiprocess
def test_the_module_runs_as_a_program(tmp_path, corpus_dir):
    run = subprocess.run(
        [sys.executable, "-m", "lrm_train.data.prepare", *small_run(corpus_dir, tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    [folder] = run.stdout.splitlines()
    assert (Path(folder) / "manifest.json").is_file()


def test_a_mixture_prepares_each_source_with_one_tokenizer_and_checks_each_folder(tmp_path, corpus_dir, capsys):
    plays = tmp_path / "plays"
    plays.mkdir()
    for i in range(4):
        (plays / f"play{i}.txt").write_text(f"Act {i}.\n" + "Now is the winter of our discontent. " * (8 + 2 * i))
    settings = small_run(corpus_dir, tmp_path / "out")[2:]  # out_root, vocab_size, num_proc
    assert main([*settings, f"data.mixture=[{{source:{corpus_dir},name:mine}},{{source:{plays}}}]"]) == 0
    folders = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert [folder.name[:-17] for folder in folders] == ["mine", "plays"]
    tokenizers = {json.loads((folder / "manifest.json").read_text())["tokenizer"]["sha256"] for folder in folders}
    assert len(tokenizers) == 1  # the second source is tokenized with the first's tokenizer

    # A folder given by path is checked, not prepared: the same folders again (the sources' are reused).
    assert main([*settings, f"data.mixture=[{{path:{folders[0]}}},{{source:{plays}}}]"]) == 0
    assert [Path(line) for line in capsys.readouterr().out.splitlines()] == folders
    (folders[0] / "train_00000.bin").write_bytes(b"\0\0")
    assert main([*settings, f"data.mixture=[{{path:{folders[0]}}},{{source:{plays}}}]"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert re.fullmatch(rf"error: {re.escape(str(folders[0]))}/train_00000.bin: 2 bytes, manifest.json says \d+", line)


def test_a_mixture_of_folders_with_two_tokenizers_or_in_parts_is_refused_in_one_line(tmp_path, corpus_dir, capsys):
    out = tmp_path / "out"
    assert main(small_run(corpus_dir, out)) == 0
    assert main([*small_run(corpus_dir, out), "data.name=other", "data.vocab_size=280"]) == 0
    first, second = (Path(line) for line in capsys.readouterr().out.splitlines())
    assert main([f"data.out_root={out}", f"data.mixture=[{{path:{first}}},{{path:{second},name:two}}]"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: data.mixture source two ({second}) has another tokenizer than local ({first})")
    assert main([f"data.out_root={out}", f"data.mixture=[{{path:{first}}}]", "data.num_parts=2"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith("error: config: data.num_parts=2 with data.mixture: prepare each source in parts")
    assert main([f"data.out_root={out}", f"data.mixture=[{{path:{first}}}]", "--tokenizer-only"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line == "error: --tokenizer-only trains the tokenizer of one source's parts: leave data.mixture out"

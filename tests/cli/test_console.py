"""What the command line prints (cli/console.py): fast help, no third-party noise, one line per warning."""

import os
import subprocess
import sys
import time

ENV = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="100")


def timed(command):
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=ENV)
    return time.perf_counter() - started, done


def test_help_and_version_start_fast_without_torch():
    bare, _ = timed([sys.executable, "-c", "pass"])
    helped, result = timed([sys.executable, "-m", "concept_attention.cli", "--help"])
    versioned, version = timed([sys.executable, "-m", "concept_attention.cli", "--version"])
    assert result.returncode == 0 and "generate" in result.stdout and version.returncode == 0
    assert helped - bare < 1.0 and versioned - bare < 1.0, (bare, helped, versioned)  # measured in one run
    probe = ("import sys\nfrom concept_attention.cli import build_parser\nbuild_parser()\n"
             "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=ENV).stdout.split() == ["False", "False"]


def test_generate_prints_no_library_warnings(tmp_path):
    done = subprocess.run([sys.executable, "-m", "concept_attention.cli", "generate", "a red circle on grass",
                           "--concepts", "red,circle,grass,zebra", "--out", str(tmp_path / "out"), "--no-figure"],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    noise = ("Warning", "warn(", "it/s]", "WARNING", "Failed to load", ".py:")
    assert not [line for line in lines if any(word in line for word in noise)], lines
    ours = [line for line in lines if "warning:" in line]
    assert ours == ["concept-attention generate: warning: some concepts split into many tokens; their scores are "
                    "averaged over all pieces: 'zebra' (6 pieces)"]

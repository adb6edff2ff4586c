"""--help on every script (configurator.py): the docstring's first paragraph, then each setting with
its default and the comment above it; and an unknown key's one error line names the nearest key."""

import os

import pytest

from configurator import configure, setting_comments
from conftest import python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def run(*args):
    return python(args, ROOT, ENV, timeout=120)


# (script, its docstring's first words, a setting as --help shows it, words of its comment)
SCRIPTS = [
    ('train.py', "Train a diffusion model", "--class_dropout=0.1", "replaced by the null class"),
    ('sample.py', "Sample from a trained checkpoint", "--ckpt_name='ckpt.pt'", "or 'best.pt'"),
    ('prepare.py', "Prepare a dataset for training", "--resolution=32", "output side in px"),
    ('bench.py', "Throughput and profiling", "--text_len=0", "conditions on random captions"),
    ('bench_samplers.py', "The exact-answer sampler benchmark", "--components=8", "mixture"),
    ('metrics.py', "Sample-quality yardsticks", "--split='val'", "which split"),
    ('vae.py', "The Stable Diffusion VAE", "--image=''", "input image for the round trip"),
]


@pytest.mark.parametrize('script, intro, setting, comment', SCRIPTS)
def test_help_lists_settings_with_defaults_and_comments(script, intro, setting, comment):
    p = run(script, '--help')
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(intro)
    lines = p.stdout.splitlines()
    # the setting, then its comment indented below it
    i = lines.index(f"  {setting}")
    assert comment in ' '.join(lines[i + 1 : i + 4])


def test_short_h_is_help_too():
    p = run('prepare.py', '-h')
    assert p.returncode == 0 and "  --resolution=32" in p.stdout


def test_a_typo_names_the_nearest_key():
    p = run('train.py', '--batch_sise=8')
    err = p.stderr.strip()
    assert p.returncode != 0 and '\n' not in err
    assert "unknown config key 'batch_sise'" in err and "did you mean --batch_size?" in err
    # the nearest key instead of the list of all of them
    assert 'known keys' not in err


def test_suggestions_in_configure(tmp_path):
    g = dict(batch_size=64, lr=1e-4, out_dir='out')
    with pytest.raises(SystemExit, match="did you mean --out_dir"):
        configure(dict(g), ['--outdir=x'])
    # in a config file too
    f = tmp_path / 'c.py'
    f.write_text("batchsize = 16\n")
    with pytest.raises(SystemExit, match=r"'batchsize' \(.*\); did you mean --batch_size\?"):
        configure(dict(g), [str(f)])
    # nothing close: the list of known keys
    with pytest.raises(SystemExit, match="known keys: batch_size, lr, out_dir"):
        configure(dict(g), ['--zzz=1'])


def test_comments_are_the_block_directly_above(tmp_path):
    f = tmp_path / 'script.py'
    f.write_text(
        '"""A script."""\n'
        "import os\n"
        "# ------------------\n"
        "# first line\n"
        "# second line\n"
        "a = 1\n"
        "b = 2\n"
        "\n"
        "# not above c: a blank line between\n"
        "\n"
        "c = 'x'  # a trailing comment is not one\n"
        "# d's\n"
        "d, e = 1, 2\n"
        "# -------\n"
        "f = (1, 2)\n"
    )
    c = setting_comments(str(f))
    assert c['a'] == ['first line', 'second line']
    assert c['b'] == [] and c['c'] == [] and c['f'] == []
    # tuple targets are no settings
    assert 'd' not in c


def test_help_without_a_file(capsys):
    g = dict(__doc__="\nWhat it does.\n\nMore.\n", steps=3, name='x')
    with pytest.raises(SystemExit) as e:
        configure(g, ['--steps=4', '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("What it does.\n") and 'More.' not in out
    # the defaults, not the overrides before --help
    assert "  --steps=3\n" in out and "  --name='x'" in out

"""Shared test helpers. pytest puts this folder on sys.path, so a test file can `from conftest
import require`."""

import importlib
import os

import pytest
import torch


def require(name):
    """import `name`, or skip the whole test file when it is not installed (a laptop without
    diffusers). With NANODIFFUSION_REQUIRE_REFS=1 (set by .ci/run) a missing module is a failure
    instead: the parity tests against diffusers are the proof the README cites, so CI must never
    pass by skipping them."""
    if os.environ.get('NANODIFFUSION_REQUIRE_REFS') != '1':
        return pytest.importorskip(name)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        # failed outside the except block: one clear line, no chained traceback
        error = e
    pytest.fail(
        f"{name} is required (NANODIFFUSION_REQUIRE_REFS=1) but cannot be imported: {error}",
        pytrace=False,
    )


def one_error_line(p, *words):
    """A finished process that failed the way bad input must: exit status != 0, exactly one line on
    stderr, starting 'error:', no traceback, and containing each of `words`."""
    assert p.returncode != 0, p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and 'Traceback' not in p.stderr, (
        p.stderr
    )
    for w in words:
        assert w in lines[0], lines[0]


def one_line_exit(fn, *words):
    """The same, in-process: fn() raises SystemExit whose message is one 'error:' line; returns
    it."""
    with pytest.raises(SystemExit) as e:
        fn()
    msg = str(e.value.code)
    assert msg.startswith('error:') and '\n' not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.fixture(scope='module')
def one_thread():
    """Tiny tensors: one thread is about as fast, and OpenMP threads spinning against another job on
    the same 2 cores made such files ~5x slower. Use as `pytestmark =
    pytest.mark.usefixtures('one_thread')`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

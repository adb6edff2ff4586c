"""Shared test helpers. pytest puts this folder on sys.path, so a test file can `from conftest
import require`."""

import atexit
import importlib
import json
import os
import subprocess
import sys
import tempfile

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


# A fork server: runs `python script.py ...` or `python -c CODE ...` as python would, forked from a
# process that imported numpy, PIL and torch once. That import is most of a tiny command's time, and
# the suite runs ~200 of them. The child takes the job's working directory and environment (only the
# thread count is read at import: one server per OMP_NUM_THREADS), runs the script as __main__, and
# exits the way python does: SystemExit and uncaught errors go through the interpreter's own exit.
SERVER = """
import json, os, runpy, signal, sys
import numpy, PIL.Image, torch
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid:
        status = os.waitpid(pid, 0)[1]
        print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
        continue
    os.chdir(job['cwd'])
    os.environ.clear()
    os.environ.update(job['env'])
    if job['timeout']:
        signal.alarm(job['timeout'])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(os.open(job['out'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(job['err'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    argv = job['argv']
    if argv[0] == '-c':
        sys.argv, sys.path[0] = ['-c'] + argv[2:], ''
        exec(compile(argv[1], '<string>', 'exec'), {'__name__': '__main__'})
    else:
        sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name='__main__')
    sys.exit(0)
"""
_servers = {}


def _server(env):
    threads = env.get('OMP_NUM_THREADS')
    if threads not in _servers:
        _servers[threads] = subprocess.Popen(
            [sys.executable, '-c', SERVER],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
    return _servers[threads]


@atexit.register
def _close_servers():
    for server in _servers.values():
        server.stdin.close()
        server.wait(timeout=60)


def python(args, cwd, env, timeout=None):
    """subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
    timeout=timeout), but forked from a server that has torch imported: args is a script and its
    arguments, or '-c' and code. A timeout kills the run and raises subprocess.TimeoutExpired."""
    args = [str(a) for a in args]
    if args[0] != '-c' and not args[0].endswith('.py'):
        return subprocess.run(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    server = _server(env)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, 'out'), os.path.join(tmp, 'err')
        job = dict(argv=args, cwd=str(cwd), env=dict(env), timeout=timeout or 0, out=out, err=err)
        server.stdin.write(json.dumps(job) + '\n')
        server.stdin.flush()
        rc = json.loads(server.stdout.readline())
        stdout, stderr = open(out).read(), open(err).read()
    if timeout and rc == -14:
        raise subprocess.TimeoutExpired([sys.executable, *args], timeout, stdout, stderr)
    return subprocess.CompletedProcess([sys.executable, *args], rc, stdout, stderr)
